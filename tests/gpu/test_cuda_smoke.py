"""GPU tier: runs only where CUDA is available (never in CI here)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_vlmo_small_bf16_forward_on_cuda():
    from vlforge.models import create_model

    model = create_model("vlmo_small").cuda().to(torch.bfloat16)
    cfg = model.config
    pixels = torch.randn(2, 3, cfg.img_size, cfg.img_size, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(1000, 2000, (2, cfg.max_text_len), device="cuda")
    mask = torch.ones_like(ids)
    out = model.forward_fusion(pixels, ids, mask)
    assert torch.isfinite(model.itm_logits(out).float()).all()
