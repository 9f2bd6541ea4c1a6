"""Methods, one module each: importing this package imports every module in it, so each registers its
attention, its cache kinds and anything else it plugs in. A new method file needs no line here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
