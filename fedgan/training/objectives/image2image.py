"""What the image-to-image tasks share: a batch of (input, target) rows made from real images,
two data-reading phases, held-out pairs and classical baselines for the evaluator.

Networks are named so that federation and checkpoints treat them like the synthesis GANs:
``generator`` is always the network that maps an input to the task's output (the one
``fedgan enhance`` applies), ``discriminator`` judges the output domain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedgan.training.objectives.base import Batch, Objective, Phase, StepContext


class ImageToImage(Objective):
    """Base of the paired tasks: subclasses implement :meth:`inputs` (and the losses).

    Both phases read real images: the generator's loss compares its output with the real
    target (and its input is made from a real image), so under DP-SGD both are private.
    """

    share_batch = True
    paired = True
    phases = (
        Phase("D", ("discriminator",), reads_data=True),
        Phase("G", ("generator",), reads_data=True),
    )

    def inputs(self, clean: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The generator's inputs made from clean images (a degradation, a downsampling)."""
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        """Side of the generator's input images."""
        return self.cfg.data.image_size

    def make_batch(self, real, labels, other, ctx: StepContext) -> Batch:  # type: ignore[no-untyped-def]
        return Batch({"inputs": self.inputs(real, ctx.cpu), "targets": real})

    def eval_pairs(self, clean: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out ``(inputs, ground truth)`` (seeded: every evaluation sees the same)."""
        return self.inputs(clean, torch.Generator().manual_seed(seed)), clean

    def baselines(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Classical methods measured the same way (inputs -> outputs, in [-1, 1])."""
        return {}

    def visible(self, inputs: torch.Tensor) -> torch.Tensor:
        """The part of the inputs a picture shows (all of it, unless the inputs carry a mask)."""
        return inputs

    def region(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Where the task changes the image (``[N, 1, H, W]``, 1 inside), scored apart from the
        whole image; None where the whole image is the task's."""
        return None

    def file_inputs(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The generator's inputs for images read from files (``fedgan enhance``).

        Raises:
            ValueError: A mask for a task that takes none.
        """
        if mask is not None:
            raise ValueError(f"--mask applies to task inpaint; this run's is {self.cfg.task.name}")
        return images


def per_image(fn: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """A scikit-image function on [0, 1] grayscale arrays, applied to ``[N, 1, H, W]`` in
    [-1, 1]."""
    import numpy as np

    def apply(x: torch.Tensor) -> torch.Tensor:
        unit = ((x.detach().cpu() + 1) / 2).clamp(0, 1).numpy().astype(np.float64)
        out = np.stack([[fn(img) for img in sample] for sample in unit])
        return torch.from_numpy(out).float() * 2 - 1

    return apply
