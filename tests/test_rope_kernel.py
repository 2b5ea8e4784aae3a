"""FP32 RoPE kernel (Triton interpreter) against a float64 rotation of the same inputs."""

from __future__ import annotations

import conftest
import pytest
import torch

from hf_fp8.kernels.rope import apply_rope, rope_bwd, rope_fwd
from hf_fp8.kernels.rope_reference import rope_angles, rope_reference

pytestmark = pytest.mark.skipif(not conftest.INTERPRETER_PATCHED, reason="needs TRITON_INTERPRET=1 (set by conftest)")


def _inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def _round_to(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Correctly rounded (nearest, ties to even) conversion of float64 to a 16-bit float, avoiding
    the double rounding of going through FP32."""
    c = x64.to(torch.float32).to(dtype)
    bits = c.view(torch.int16)
    cands = torch.stack([c, (bits + 1).view(dtype), (bits - 1).view(dtype)])
    err = (cands.double() - x64).abs()
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    best = err.min(dim=0).values
    tie_ok = (err == best) & ((cands.view(torch.int16) & 1) == 0)
    pick = torch.where(tie_ok.any(0), tie_ok.float().argmax(0), (err == best).float().argmax(0))
    return cands.gather(0, pick[None]).squeeze(0)


def _exact_rotation(x: torch.Tensor, position_ids, inv_freq, inverse=False) -> torch.Tensor:
    """The rotation by the model's FP32 angle, evaluated in float64, correctly rounded to x's dtype."""
    angle = rope_angles(position_ids, inv_freq).double()[:, :, None, :]
    c, s = torch.cos(angle), torch.sin(angle)
    if inverse:
        s = -s
    x1, x2 = x.double().chunk(2, dim=-1)
    return _round_to(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1), x.dtype)


def _hf_bf16_rotation(x, position_ids, inv_freq):
    """What stock HF Llama does: cos/sin rounded to BF16, rotation in BF16."""
    angle = rope_angles(position_ids, inv_freq)
    emb = torch.cat((angle, angle), dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, :, None, :], emb.sin().to(x.dtype)[:, :, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@pytest.mark.parametrize("theta", [500000.0, 1e6], ids=["llama3", "qwen_mistral"])
def test_long_sequence_is_correctly_rounded(theta):
    """rope_theta 500000 (Llama-3) and 1e6 (Qwen2/2.5/3, Mistral v0.3), S=8192, head_dim 128,
    BF16: >= 99.9% of outputs equal the correctly rounded rotation (stock HF's BF16 path gets
    about 2/3), forward and backward."""
    torch.manual_seed(0)
    S, D = 8192, 128
    q = torch.randn(1, S, 4, D, dtype=torch.bfloat16)
    k = torch.randn(1, S, 2, D, dtype=torch.bfloat16)  # GQA: 4 query heads, 2 key heads
    pos = torch.arange(S).view(1, S)
    inv = _inv_freq(theta, D)
    qo, ko = rope_fwd(q, k, pos, inv)
    exact_q, exact_k = _exact_rotation(q, pos, inv), _exact_rotation(k, pos, inv)
    frac_q = (qo == exact_q).float().mean().item()
    frac_k = (ko == exact_k).float().mean().item()
    assert frac_q >= 0.999 and frac_k >= 0.999, (frac_q, frac_k)
    hf = (_hf_bf16_rotation(q, pos, inv) == exact_q).float().mean().item()
    assert hf < 0.8, f"stock HF's BF16 rotation scored {hf}: the comparison is not discriminating"

    dq, dk = rope_bwd(q, k, pos, inv)  # q, k stand in for output gradients
    frac_dq = (dq == _exact_rotation(q, pos, inv, inverse=True)).float().mean().item()
    frac_dk = (dk == _exact_rotation(k, pos, inv, inverse=True)).float().mean().item()
    assert frac_dq >= 0.999 and frac_dk >= 0.999, (frac_dq, frac_dk)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "B, S, Hq, Hk, D, per_seq",
    [
        (2, 37, 4, 4, 64, False),  # equal heads, odd length
        (2, 50, 8, 2, 128, True),  # GQA, per-sequence position_ids (packed / left-padded batches)
        (1, 5, 3, 1, 80, False),  # head_dim/2 = 40: not a power of two
    ],
)
def test_matches_fp32_reference(dtype, B, S, Hq, Hk, D, per_seq):
    q = torch.randn(B, S, Hq, D, dtype=dtype)
    k = torch.randn(B, S, Hk, D, dtype=dtype)
    pos = torch.randint(0, 4096, (B, S)) if per_seq else torch.arange(S).view(1, S) + 3
    inv = _inv_freq(500000.0, D)
    for backward in (False, True):
        fn = rope_bwd if backward else rope_fwd
        a = fn(q, k, pos, inv, 1.0)
        b = rope_reference(q, k, pos, inv, 1.0, backward=backward)
        for x, y in zip(a, b):
            assert x.dtype == dtype and x.shape == y.shape
            if dtype == torch.float32:
                # FP32 outputs: the kernel's and torch's cos/sin differ by ~1 ulp (1.2e-7)
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
            else:
                # one rounding each from nearly the same FP32 value: all but rare boundary cases agree
                assert (x == y).float().mean().item() > 0.999


def test_autograd_and_scaling():
    q = torch.randn(2, 9, 2, 32, dtype=torch.float32, requires_grad=True)
    k = torch.randn(2, 9, 1, 32, dtype=torch.float32, requires_grad=True)
    pos = torch.arange(9).view(1, 9)
    inv = _inv_freq(10000.0, 32)
    qo, ko = apply_rope(q, k, pos, inv, 0.5)
    (qo.square().sum() + ko.sum()).backward()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    rq, rk = rope_reference(q2, k2, pos, inv, 0.5)
    (rq.square().sum() + rk.sum()).backward()
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.grad, k2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qo, rq, rtol=1e-5, atol=1e-5)


def test_strided_input_from_a_projection_view():
    """q_proj(x).view(B, S, H, D) is used as is; a transposed (B, H, S, D) view is accepted too."""
    x = torch.randn(2, 11, 4 * 32, dtype=torch.bfloat16)
    q = x.view(2, 11, 4, 32)
    kt = torch.randn(2, 2, 11, 32, dtype=torch.bfloat16).transpose(1, 2)  # non-contiguous, unit stride on D
    pos = torch.arange(11).view(1, 11)
    inv = _inv_freq(10000.0, 32)
    a = rope_fwd(q, kt, pos, inv)
    b = rope_reference(q, kt, pos, inv)
    assert all((x_ == y_).float().mean() > 0.999 for x_, y_ in zip(a, b))


def test_bad_inputs():
    q = torch.randn(1, 4, 2, 16)
    pos = torch.arange(4).view(1, 4)
    with pytest.raises(ValueError, match="inv_freq: expected float32"):
        rope_fwd(q, q, pos, _inv_freq(10000.0, 16).bfloat16())
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        rope_fwd(q[0], q[0], pos, _inv_freq(10000.0, 16))
    with pytest.raises(ValueError, match="position_ids"):
        rope_fwd(q, q, torch.arange(5).view(1, 5), _inv_freq(10000.0, 16))
    with pytest.raises(TypeError, match="integer"):
        rope_fwd(q, q, pos.float(), _inv_freq(10000.0, 16))
