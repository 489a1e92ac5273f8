"""Feature extractors for distribution metrics: a small domain classifier trained once on the
real evaluation data (cached by a hash of that data), and the standard FID Inception network."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedgan.progress import track
from fedgan.rundir import atomic_write_bytes

DOMAIN_VERSION = "domain-cnn-v1"  # part of the cache key: bump when the recipe changes


def data_hash(*tensors: torch.Tensor, extra: str = "") -> str:
    """A stable hash of tensors' contents (and ``extra``), for cache keys."""
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


class DomainCNN(nn.Module):
    """A small CNN; its 128-d penultimate layer is the domain feature space."""

    def __init__(self, channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(8, 2 * width),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            nn.GroupNorm(8, 4 * width),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    batch_size: int = 64,
    balanced: bool = False,
) -> DomainCNN:
    """Trains a :class:`DomainCNN` on ``images`` in [-1, 1] (flip augmentation).

    With ``balanced``, the loss weighs classes by inverse frequency. Without it, images that
    carry no label information still teach the majority class to follow the mean feature
    direction, and the classifier then ranks real images by a class-correlated statistic (AUC
    far from 0.5 for noise): TSTR needs the balanced form.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainCNN(images.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all, y_all = images.to(device), labels.to(device)
    weight = None
    if balanced:
        counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).float()
        weight = (counts.sum() / (num_classes * counts)).to(device)
    model.train()
    for _ in track(range(epochs), "training the domain feature network"):
        order = torch.randperm(len(x_all), generator=g).to(device)
        for idx in order.split(batch_size):
            x, y = x_all[idx], y_all[idx]
            flip = torch.rand(len(x), generator=g).to(device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y, weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def _rotations(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image at 0/90/180/270 degrees, with target ``label * 4 + rotation``: the rotation
    task keeps the features informative even where the data hold a single class."""
    xs = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    ys = [labels * 4 + k for k in range(4)]
    return torch.cat(xs), torch.cat(ys)


class DomainFeatures:
    """Domain feature space: a classifier trained once on the real evaluation images (label and
    rotation), cached on disk by a hash of those images, labels and the recipe.

    Args:
        images: Real evaluation images in [-1, 1].
        labels: Their class labels.
        cache_dir: Where trained weights are kept.
        device: Where to train and extract.
        epochs: Training epochs (part of the cache key).
    """

    name = "domain"

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        cache_dir: Path,
        device: torch.device,
        epochs: int = 8,
    ) -> None:
        self.device = device
        num_classes = int(labels.max()) + 1 if len(labels) else 1
        key = data_hash(images, labels, extra=f"{DOMAIN_VERSION}-{epochs}")
        self.cache_path = Path(cache_dir) / f"domain_{key}.pt"
        self.model = DomainCNN(images.shape[1], num_classes * 4).to(device)
        state = None
        if self.cache_path.exists():
            try:
                state = torch.load(self.cache_path, map_location=device, weights_only=True)
                self.model.load_state_dict(state)
            except Exception:  # a truncated or foreign cache entry is trained again
                state = None
        self.cache_hit = state is not None
        if not self.cache_hit:
            x, y = _rotations(images, labels.long())
            self.model = train_classifier(
                x, y, num_classes * 4, epochs=epochs, seed=0, device=device
            )
            buf = io.BytesIO()
            torch.save(self.model.state_dict(), buf)
            atomic_write_bytes(self.cache_path, buf.getvalue())
        self.model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` images in [-1, 1] -> ``[N, 128]`` features (CPU)."""
        out = [self.model.features(b.to(self.device)).cpu() for b in images.split(256)]
        return torch.cat(out)


class InceptionFeatures:
    """The standard FID Inception-v3 (TF 2015-12-05 weights) 2048-d pool features, through
    torchmetrics / torch-fidelity.

    Args:
        weights_path: A local copy of the weights; empty to let torch-fidelity download them.
        device: Where to run it.
    """

    name = "inception"

    def __init__(self, weights_path: str, device: torch.device) -> None:
        from torchmetrics.image.fid import NoTrainInceptionV3

        if weights_path and not Path(weights_path).is_file():
            raise FileNotFoundError(
                f"eval.inception_weights {weights_path!r} does not exist; point it at the FID "
                "Inception weights (pt_inception-2015-12-05) or leave it empty to download them"
            )
        self.device = device
        self.model = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path or None,
        ).to(device)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` images in [-1, 1] -> ``[N, 2048]`` features (CPU)."""
        out = []
        for b in track(images.split(64), f"Inception features of {len(images)} images"):
            x = ((b.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            out.append(self.model(x.to(self.device)).cpu().double())
        return torch.cat(out)


class LPIPSDistance:
    """LPIPS (Zhang et al. 2018): VGG16 features with the learned linear weights, through
    ``piq``; grey images are repeated to three channels.

    Args:
        weights_dir: A folder holding ``vgg16-397923af.pth`` (torchvision's ImageNet VGG16; its
            ``features.*`` entries suffice) and ``lpips_weights.pt`` (piq's release v0.4.0),
            the files a download would fetch; ``download`` lets piq and torchvision fetch them.
        device: Where to run it.

    Raises:
        FileNotFoundError: A file missing from ``weights_dir`` (one line naming it and the fix).
    """

    VGG_FILE = "vgg16-397923af.pth"
    LINEAR_FILE = "lpips_weights.pt"
    LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

    def __init__(self, weights_dir: str, device: torch.device) -> None:
        from piq.perceptual import VGG16_LAYERS, ContentLoss

        self.device = device
        if weights_dir == "download":
            import piq

            try:
                self.model: nn.Module = piq.LPIPS(reduction="none")
            except Exception as err:  # offline, proxy, ...
                raise FileNotFoundError(
                    f"LPIPS weights could not be downloaded ({type(err).__name__}); set "
                    "eval.lpips_weights to a folder holding "
                    f"{self.VGG_FILE} and {self.LINEAR_FILE}"
                ) from err
        else:
            from torchvision.models import vgg16

            folder = Path(weights_dir)
            for name in (self.VGG_FILE, self.LINEAR_FILE):
                if not (folder / name).is_file():
                    raise FileNotFoundError(
                        f"eval.lpips_weights: {folder / name} does not exist; put torchvision's "
                        f"{self.VGG_FILE} and piq's {self.LINEAR_FILE} in {folder}, or set "
                        "eval.lpips_weights=download where the network is reachable"
                    )
            state = torch.load(folder / self.VGG_FILE, map_location="cpu", weights_only=True)
            features = vgg16(weights=None).features
            own = {k.removeprefix("features."): v for k, v in state.items() if "features." in k}
            features.load_state_dict(own)
            linear = torch.load(folder / self.LINEAR_FILE, map_location="cpu", weights_only=True)
            self.model = ContentLoss(
                features, layers=[VGG16_LAYERS[n] for n in self.LAYERS], weights=list(linear),
                normalize_features=True, distance="mse", reduction="none",
            )  # fmt: skip
        # LPIPS reads relu5_3 and never the last pooling, which images under 32 px cannot take.
        body = self.model.model
        if isinstance(body, nn.Sequential) and isinstance(body[-1], nn.MaxPool2d):
            self.model.model = body[:-1]
        self.model.to(device).eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS per image of ``[N, C, H, W]`` images in [0, 1] (0 for identical images)."""
        out = []
        for a, b in zip(x.split(64), y.split(64), strict=True):
            if a.shape[1] == 1:
                a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
            out.append(self.model(a.float().to(self.device), b.float().to(self.device)).cpu())
        return torch.cat(out)
