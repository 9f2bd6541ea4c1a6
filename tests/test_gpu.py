"""GPU checks (`make test-all` on a CUDA machine; skipped elsewhere)."""

import pytest
import torch
from helpers import assert_cached_equals_uncached, random_ids, randomized

from kvcompress.methods.ka import ka_attention, ka_attention_reference
from kvcompress.models import GPTNeoX, ModelConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("attention", ["standard", "vdproj", "ka"])
def test_cached_equals_uncached_on_cuda(attention):
    kwargs = {"rank": 0.5} if attention == "vdproj" else {}
    cfg = ModelConfig.from_name("tiny", attention=attention, attention_kwargs=kwargs)
    model = randomized(GPTNeoX(cfg), dtype=torch.float64).cuda()
    prompt = random_ids(3, 7).cuda()
    assert_cached_equals_uncached(model, prompt, 10, atol=1e-9)


def test_ka_attention_on_cuda_matches_the_reference():
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=torch.float64, device="cuda", requires_grad=True) for _ in range(3))
    out, ref = ka_attention(q, k, v), ka_attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0)


def test_bf16_autocast_training_step_is_finite():
    model = GPTNeoX(ModelConfig.from_name("tiny")).cuda()
    ids = random_ids(4, 33).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
