"""What the full preset's UNet costs, counted rather than hoped: the FLOPs of one forward (a denoising step) at
256x256 and 256x1024 and of one training step (forward and backward) at 256x256, the bytes of its weights and
of DDP's gradient all-reduce, and the activations a training step keeps for its backward. The figures
cluster/README.md's sizing tables are derived from.

    python benchmarks/count_flops.py

Counted by torch (`FlopCounterMode`: 2 FLOPs per multiply-add of convolutions, matmuls and attention) on the
meta device, batch 1: shapes only, no arithmetic, so it takes seconds on any machine. There attention decomposes
into matmuls that are counted; on CPU tensors torch has no formula for its flash-attention kernel and leaves them
out (495.7 instead of 496.4 GFLOP at 256x256, 1,982.9 instead of 1,993.8 at 256x1024: BENCHMARKS.md's earlier
count). Norms, activations and additions are not counted (memory-bound on a GPU anyway). The last line is one
JSON object.
"""

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from audiodiff import models


def forward_flops(unet, height: int, width: int) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(1, 1, height, width, device="meta"), torch.tensor([0], device="meta"))
    return counter.get_total_flops()


def training_step(unet, height: int, width: int) -> tuple[int, int]:
    """FLOPs of a forward and backward, and the bytes of the tensors autograd keeps for the backward (fp32)."""
    saved = {}  # bytes by storage (its C++ address), so that views of one tensor count once

    def keep(tensor):
        saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = unet(torch.zeros(1, 1, height, width, device="meta"), torch.tensor([0], device="meta")).sample
        out.pow(2).mean().backward()
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    return counter.get_total_flops(), sum(size for storage, size in saved.items() if storage not in weights)


def count() -> dict:
    unet = models.new_model("full").unet.to("meta").train()
    parameters = sum(p.numel() for p in unet.parameters())
    standard, extended = forward_flops(unet, 256, 256), forward_flops(unet, 256, 1024)
    train_flops, activations = training_step(unet, 256, 256)
    return {
        "parameters": parameters,
        "weights_fp32_bytes": parameters * 4, "weights_bf16_bytes": parameters * 2,
        "ddp_gradient_fp32_bytes": parameters * 4, "ddp_gradient_bf16_bytes": parameters * 2,
        # AdamW: weights, gradients, two moments in fp32; EMA: a fourth copy
        "training_state_fp32_bytes": parameters * 4 * 5,
        "forward_gflop_256x256": standard / 1e9, "forward_gflop_256x1024": extended / 1e9,
        "train_step_gflop_256x256": train_flops / 1e9,
        "saved_activations_fp32_bytes_per_image_256x256": activations,
    }


def main() -> None:
    figures = count()
    print(f"full UNet: {figures['parameters'] / 1e6:.1f} M parameters, {figures['weights_fp32_bytes'] / 1e6:.0f} MB "
          "of fp32 weights (and of DDP's fp32 gradients per step)")
    print(f"forward, batch 1: {figures['forward_gflop_256x256']:.1f} GFLOP at 256x256, "
          f"{figures['forward_gflop_256x1024']:.1f} GFLOP at 256x1024")
    print(f"training step at 256x256: {figures['train_step_gflop_256x256']:.1f} GFLOP per image, "
          f"{figures['saved_activations_fp32_bytes_per_image_256x256'] / 1e9:.2f} GB of fp32 activations kept "
          "for the backward")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
