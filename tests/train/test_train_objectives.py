"""Tests of the self-supervised objectives: NT-Xent (also across DDP ranks) and masked reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.train.objectives import masked_reconstruction_loss, nt_xent_loss, random_patch_mask


def test_nt_xent_is_lower_for_matching_pairs_than_for_random_ones():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(64, 32, generator=g)
    matching = z1 + 0.05 * torch.randn(64, 32, generator=g)
    unrelated = torch.randn(64, 32, generator=g)
    assert nt_xent_loss(z1, matching, 0.2) < 0.2 * nt_xent_loss(z1, unrelated, 0.2)
    # Random pairs are no better than guessing among the 2N - 1 other views.
    assert nt_xent_loss(z1, unrelated, 1.0).item() == pytest.approx(np.log(127), rel=0.1)


def test_nt_xent_with_one_pair_has_only_the_partner_to_pick():
    z = torch.randn(1, 8)
    assert nt_xent_loss(z, torch.randn(1, 8), 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_masked_loss_counts_only_hidden_pixels():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 8, 8, generator=g)
    mask = random_patch_mask(4, 8, patch=2, ratio=0.5, g=g)
    wrong_where_visible = torch.where(mask.bool(), target, target + 1.0)
    assert masked_reconstruction_loss(wrong_where_visible, target, mask).item() == 0.0
    wrong_where_hidden = torch.where(mask.bool(), target + 0.5, target)
    assert masked_reconstruction_loss(wrong_where_hidden, target, mask).item() == pytest.approx(0.25)


def test_patch_mask_hides_the_ratio_in_whole_patches():
    mask = random_patch_mask(16, 8, patch=2, ratio=0.5, g=torch.Generator().manual_seed(1))
    assert mask.shape == (16, 1, 8, 8)
    assert torch.all(mask.mean(dim=(1, 2, 3)) == 0.5)
    blocks = mask.unfold(2, 2, 2).unfold(3, 2, 2)  # [B, 1, 4, 4, 2, 2]
    assert torch.all(blocks.amin(dim=(-1, -2)) == blocks.amax(dim=(-1, -2)))  # every 2x2 patch all or nothing


GATHER_CHECK = '''
import torch, torch.distributed as dist
from components.train.objectives import nt_xent_loss
from components.train.runtime import gather_with_grad
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(0)
z1_all, z2_all = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
rows = slice(rank * 4, (rank + 1) * 4)
z1, z2 = z1_all[rows].clone().requires_grad_(), z2_all[rows].clone().requires_grad_()
nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), 0.3).backward()
ref1, ref2 = z1_all.clone().requires_grad_(), z2_all.clone().requires_grad_()
nt_xent_loss(ref1, ref2, 0.3).backward()
# Every rank computes the global loss: its gradient is world x the single-process one; DDP's mean undoes that.
assert torch.allclose(z1.grad / world, ref1.grad[rows], atol=1e-6), (z1.grad / world, ref1.grad[rows])
assert torch.allclose(z2.grad / world, ref2.grad[rows], atol=1e-6)
print(f"rank {rank} ok", flush=True)
dist.destroy_process_group()
'''


def test_contrastive_negatives_span_ranks_with_exact_gradients(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "gather_check.py"
    script.write_text(GATHER_CHECK)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank 0 ok" in out.stdout and "rank 1 ok" in out.stdout
