"""One typed experiment config: YAML files, ``--set`` overrides and Flower run-config all meet here.

The config is a tree of frozen dataclasses. It travels through Flower as a flat run-config
(``{"train.batch_size": 32, ...}``, scalars only) and comes back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

Scalar = bool | int | float | str


def _fail(key: str, problem: str) -> typing.NoReturn:
    raise ValueError(f"config key {key!r}: {problem}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        _fail(key, f"must be > 0, got {value!r}")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        _fail(key, f"must be in [{low}, {high}], got {value!r}")


def _check_choice(key: str, value: str, allowed: list[str]) -> None:
    if value not in allowed:
        _fail(key, f"unknown value {value!r}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class RunSection:
    """Where a run writes and how it is seeded.

    Attributes:
        name: Run name; results go to ``<output_dir>/<name>/``.
        output_dir: Parent folder of run directories (relative paths resolve against the
            current directory of the process that resolves the config).
        seed: Seeds data generation, partitioning, initialization and sampling.
        resume: Continue from the run directory's latest checkpoint instead of starting over.
        keep_checkpoints: How many of the newest rounds' checkpoints a run keeps on disk; 0
            keeps every round's. Round 0 (the start), the round ``eval.select`` chose
            (``checkpoints/best``) and every round whose line of ``metrics.jsonl`` is not
            written yet are kept too, and never fewer than ``eval.average_rounds`` newest
            (a resumed run averages them again). At least 2, so that a resume has an older
            checkpoint to fall back on. A long study's checkpoints otherwise grow with its
            rounds until the disk is full.
    """

    name: str = "default"
    output_dir: str = "runs"
    seed: int = 0
    resume: bool = False
    keep_checkpoints: int = 0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            _fail("run.name", f"must be a plain folder name (no '/', spaces), got {self.name!r}")
        if not self.output_dir:
            _fail("run.output_dir", "must not be empty")
        keep = self.keep_checkpoints
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0 or keep == 1:
            _fail(
                "run.keep_checkpoints",
                f"must be 0 (keep every round's) or 2 or more (the newest rounds' kept), got "
                f"{keep!r}: with 1 a resume would have no older checkpoint to fall back on",
            )


@dataclass(frozen=True)
class DataSection:
    """Which images each hospital holds and how simulations split them.

    Attributes:
        source: Data set name (``phantom`` is embedded and offline; see ``fedgan.data``).
        path: A local file or folder (``medmnist``: the ``.npz`` or its folder; ``folder``: the
            image folder). In deployment a SuperNode's ``data-path`` replaces it.
        subset: MedMNIST subset name (e.g. ``pneumoniamnist``).
        image_size: Side of the square images the models see; data are resized to it.
        channels: 1 (grayscale) or 3 (RGB).
        num_images: Phantom only: how many scans the whole consortium holds.
        lesion_fraction: Phantom only: share of scans with a lesion (class label 1).
        train_label: Train on the images of this label only (the healthy class, e.g. 0 for
            the phantom and PneumoniaMNIST, for ``task.name: anomaly``); -1 trains on all.
            Central evaluation always sees every label.
        eval_fraction: Share of the pooled data held out for central evaluation (whole files
            for file sources, so a volume's slices never sit on both sides).
        partition: How a simulation splits the pool across hospitals: ``iid``, ``dirichlet``
            (label skew), ``quantity`` (size skew), ``site-shift`` (one site folder, or one
            synthetic scanner profile, per hospital).
        dirichlet_alpha: Concentration of ``dirichlet`` and ``quantity`` (smaller = more skewed).
        fit: How images of another size reach ``image_size``: ``resize``, ``crop`` (center square
            first), ``pad`` (pad to a square first), ``none`` (refuse other sizes).
        augment: Random horizontal flips and small rotations of real training images.
        augment_rotation: Largest rotation of ``augment``, in degrees.
        window_center: DICOM display window centre (in rescaled units, e.g. HU); used when
            ``window_width`` > 0.
        window_width: DICOM window width; 0 uses each file's own window, else robust percentiles.
        slice_axis: NIfTI axis (0, 1, 2) along which volumes are cut into 2D slices.
        min_foreground: NIfTI slices with a smaller share of non-background pixels are dropped.
        site_folders: Files lie under ``path/<site>/[<class>/]``; ``site-shift`` gives site h to
            hospital h.
        skip_bad_files: Skip unreadable or unusable files (counted in the log) instead of stopping.
        classes: Folder sources: the class sub-folder names in label order, comma-separated
            (``normal,pneumonia``: ``normal/`` is label 0). Empty: the names a folder holds,
            sorted. Set it for a deployment: each site numbers only the folders it has, so a
            site without ``abnormal/`` would call ``normal/`` 0 where another calls it 1.
    """

    source: str = "phantom"
    path: str = ""
    subset: str = "pneumoniamnist"
    image_size: int = 32
    channels: int = 1
    num_images: int = 2400
    lesion_fraction: float = 0.5
    train_label: int = -1
    eval_fraction: float = 0.1
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    fit: str = "resize"
    augment: bool = False
    augment_rotation: float = 10.0
    window_center: float = 40.0
    window_width: float = 0.0
    slice_axis: int = 2
    min_foreground: float = 0.05
    site_folders: bool = False
    skip_bad_files: bool = False
    classes: str = ""

    def class_names(self) -> list[str]:
        """``classes`` as a list (empty: the folders' own names, sorted)."""
        return [n.strip() for n in self.classes.split(",") if n.strip()]

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size & (self.image_size - 1):
            _fail("data.image_size", f"must be a power of two >= 16, got {self.image_size}")
        if self.channels not in (1, 3):
            _fail("data.channels", f"must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.num_images < 8:
            _fail("data.num_images", f"must be >= 8, got {self.num_images}")
        _check_range("data.lesion_fraction", self.lesion_fraction, 0.0, 1.0)
        if self.train_label < -1:
            _fail(
                "data.train_label",
                f"must be a class label >= 0, or -1 for all, got {self.train_label}",
            )
        names = self.class_names()
        if len(set(names)) != len(names) or any(n in (".", "..") or "/" in n for n in names):
            _fail(
                "data.classes",
                f"must name each class folder once, comma-separated (e.g. normal,pneumonia), "
                f"got {self.classes!r}",
            )
        _check_range("data.eval_fraction", self.eval_fraction, 0.0, 0.5)
        _check_positive("data.dirichlet_alpha", self.dirichlet_alpha)
        _check_choice("data.fit", self.fit, ["resize", "crop", "pad", "none"])
        _check_range("data.augment_rotation", self.augment_rotation, 0.0, 180.0)
        if self.window_width < 0:
            _fail(
                "data.window_width",
                f"must be >= 0 (0 = each file's own window), got {self.window_width}",
            )
        if self.slice_axis not in (0, 1, 2):
            _fail("data.slice_axis", f"must be 0, 1 or 2, got {self.slice_axis}")
        _check_range("data.min_foreground", self.min_foreground, 0.0, 1.0)


@dataclass(frozen=True)
class ModelSection:
    """The GAN family and its size.

    Attributes:
        family: Registered GAN family name (see ``fedgan.models.FAMILIES``).
        latent_dim: Size of the generator's noise vector.
        base_channels: Width of the narrowest layer; deeper layers double it (the number of
            layers follows from the image size: the preset by resolution).
        num_classes: Classes of a conditional family (``cgan``); every label must be below it.
        init_from: A warm start: a run directory (its latest checkpoint) or a checkpoint file
            whose networks this run starts from instead of random weights, typically
            ``fedgan pretrain`` on public data. It costs no privacy: the hospitals'
            accountants cover only what they train here. Empty: random initial weights.
        d_norm: The normalization of the ``dcgan``, ``cgan`` and ``wgan-gp`` discriminators'
            inner stages: ``group`` (GroupNorm) or ``none`` (a biased convolution alone, as
            Bie, Kamath & Zhang 2023 train private GANs).
    """

    family: str = "dcgan"
    latent_dim: int = 64
    base_channels: int = 32
    num_classes: int = 2
    init_from: str = ""
    d_norm: str = "group"

    def __post_init__(self) -> None:
        _check_positive("model.latent_dim", self.latent_dim)
        if self.num_classes < 2:
            _fail("model.num_classes", f"must be >= 2, got {self.num_classes}")
        if self.base_channels < 4:
            _fail("model.base_channels", f"must be >= 4, got {self.base_channels}")
        _check_choice("model.d_norm", self.d_norm, ["group", "none"])


#: ``train.diff_augment``'s policies (DiffAugment's names).
DIFF_AUGMENT_POLICIES = ("color", "translation", "cutout")

#: ``train.critic_schedule`` values.
CRITIC_SCHEDULES = ("auto", "fixed", "adaptive")


@dataclass(frozen=True)
class TrainSection:
    """Local training at each hospital (and in the centralized baseline).

    Attributes:
        batch_size: Real images per discriminator step.
        local_steps: GAN iterations (one D step + one G step) per hospital per round.
        lr_g: Generator Adam learning rate.
        lr_d: Discriminator Adam learning rate.
        beta1: Adam beta1 (0.5 is the DCGAN setting).
        beta2: Adam beta2.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        num_threads: Torch CPU threads per training process; 0 keeps torch's default.
        n_critic: Discriminator steps per generator step; 0 takes the family's (5 for wgan-gp),
            and at least 3 under ``privacy.mode: dp-sgd``. The adaptive schedule starts there.
        gp_weight: Gradient-penalty weight of ``wgan-gp``.
        critic_schedule: How many discriminator steps each generator step waits for:
            ``fixed`` (``n_critic``), ``adaptive`` (Bie, Kamath & Zhang 2023: raise n_D through
            1, 2, 5, 10, 20, 50, ... whenever the moving average of the discriminator's
            accuracy on generated images falls to ``critic_threshold``), or ``auto``: adaptive
            under ``privacy.mode: dp-sgd`` (only the discriminator's steps cost privacy, so
            spending them on a stronger discriminator is what a private GAN needs), fixed
            otherwise.
        critic_threshold: The adaptive schedule raises n_D when the moving average of the
            discriminator's accuracy on generated images is at or below this.
        critic_ceiling: The adaptive schedule also steps n_D one rung back down (never below
            where it started) when that average rises to this: the discriminator is winning
            and the generator is starved of steps. -1 (the default): ``critic_threshold +
            0.05`` (0.65), except under DP-SGD below epsilon 3, where it is off; 0: off, it
            only climbs, as in the paper. Otherwise it must be above ``critic_threshold``.
            Study 40 (simulations/README.md): at epsilon 10 it lowered the private FD on
            eight of ten seeds and partitions (by 0.29-0.70) and raised it on one (by 0.15);
            at epsilon 1 it helped two 40-round runs of four (one diverged without it) and
            slowed the other two.
        critic_max: The highest n_D the adaptive schedule climbs to (the highest rung of
            1, 2, 5, 10, 20, 50, ... not above it), so that every round still buys its
            hospital some generator steps. -1 (the default): 10 wherever the default
            ceiling is on under DP-SGD (from epsilon 3), no cap elsewhere; 0: no cap, as in
            the paper. Otherwise at least the schedule's start. At epsilon 10 under
            Dirichlet 0.5, hospitals at n_D 50 took two or three generator steps in a round of
            120 discriminator steps and held the federation back (simulations/README.md,
            study 42, which measures the cap on four seeds).
        critic_beta: Decay of that moving average (one value per generator step).
        critic_grace: Generator steps after a change of n_D (and at the start) before the
            next.
        d_steps_per_round: Under the adaptive schedule, the discriminator steps each round
            takes (what DP-SGD is calibrated and charged for); the schedule decides how many
            generator steps they buy. 0: ``local_steps`` x the starting n_D, as the fixed
            schedule takes. At a fixed budget, more of them cost little extra noise and buy
            a private generator quality for time (simulations/README.md, study 29: twice
            the steps, recall 0.47 to 0.64 at 1.8x the time), in layout and variety, not
            in the standard FID's texture (study 49: 5x, FID 240 to 228).
        mode_seeking: Weight of the mode-seeking term in a synthesis generator's loss (Mao et
            al. 2019, MSGAN): the generator's batch is split into two halves, and the term is
            ``weight / (mean|G(z1) - G(z2)| / mean|z1 - z2| + 1e-5)``, which is large when two
            latent codes draw the same image. It reads no real image, so under DP-SGD it
            costs no privacy. 0 turns it off.
        lr_schedule: The learning rates across rounds: ``constant``, or ``cosine``: round r
            of R trains at ``lr * (lr_final + (1 - lr_final) * (1 + cos(pi (r-1)/(R-1))) / 2)``,
            from the full rate in round 1 to ``lr_final`` of it in the last (constant within a
            round; the same at every hospital and in the pooled baseline).
        lr_final: The share of the learning rates the cosine schedule ends at.
        diff_augment: Synthesis: DiffAugment (Zhao et al. 2020), a comma-separated list of
            ``color``, ``translation``, ``cutout``: the same random transforms of real and
            generated images wherever the discriminator sees them, in both players' steps
            (the generator's gradient flows through them). Empty: off.
        diff_augment_views: Augmentation multiplicity (De et al. 2022, "Unlocking
            high-accuracy differentially private image classification through scale"): each
            real image and the generated image paired with it are seen under this many
            independent DiffAugment draws per step, and their losses averaged. Under DP-SGD
            the average is taken before the pair is clipped, so the privacy cost per step is
            unchanged and the augmentation's variance is averaged instead of added to the
            noise; the discriminator's forward grows by this factor. 1: one draw.
        embedding_weight: Synthesis with an unconditional family: the weight of a
            moment-matching term in the generator's loss (DP-MERF, Harder et al. 2021,
            "DP-MERF: Differentially private mean embeddings with random features"): the
            squared distance between the mean random-feature embedding of a generated batch
            and that of the hospital's own images. Under ``privacy.mode: dp-sgd`` the
            hospital releases that embedding once, with Gaussian noise
            (``privacy.embedding_noise``), and its accountant charges the release; the pull
            towards every part of the data is what keeps a private generator from dropping
            modes (simulations/README.md, study 33). A hospital with fewer than
            ``sqrt(embedding_features) * embedding_noise`` images, whose release would be
            mostly noise, releases nothing and trains without it. 0: off. -1 (the default):
            under ``dp-sgd`` for task ``synthesis`` with an unconditional family,
            ``3 * sqrt(10 / target_epsilon)`` but at least 5 (``5 * sqrt(10 / epsilon)``
            above epsilon 10), up to 10: 5 at epsilon 10, 5.5 at 3, 9.5 at 1 (the noisier the
            discriminator, the harder the pull; studies 34 and 37), 0 otherwise.
        embedding_features: Random Fourier features of the embedding (half cosines, half
            sines of random projections of the pixels; each image's feature vector has norm 1).
        embedding_bandwidth: The Gaussian kernel's bandwidth in pixel space (images in
            [-1, 1]); 0 takes ``0.15 * sqrt(pixels)``, a rule that reads no image (the
            median distance between chest films at 32 px is about twice that).
    """

    batch_size: int = 32
    local_steps: int = 20
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    device: str = "auto"
    num_threads: int = 0
    n_critic: int = 0
    gp_weight: float = 10.0
    critic_schedule: str = "auto"
    critic_threshold: float = 0.6
    critic_ceiling: float = -1.0
    critic_max: int = -1
    critic_beta: float = 0.99
    critic_grace: int = 25
    d_steps_per_round: int = 0
    mode_seeking: float = 0.0
    lr_schedule: str = "constant"
    lr_final: float = 0.1
    diff_augment: str = ""
    diff_augment_views: int = 1
    embedding_weight: float = -1.0
    embedding_features: int = 2000
    embedding_bandwidth: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.local_steps", self.local_steps)
        _check_positive("train.lr_g", self.lr_g)
        _check_positive("train.lr_d", self.lr_d)
        _check_range("train.beta1", self.beta1, 0.0, 0.9999)
        _check_range("train.beta2", self.beta2, 0.0, 0.99999)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            _fail(
                "train.device", f"unknown device {self.device!r}; allowed: auto, cpu, cuda, cuda:N"
            )
        if self.n_critic < 0:
            _fail("train.n_critic", f"must be >= 0 (0 = the family's default), got {self.n_critic}")
        if self.gp_weight < 0:
            _fail("train.gp_weight", f"must be >= 0, got {self.gp_weight}")
        if self.num_threads < 0:
            _fail("train.num_threads", f"must be >= 0 (0 = torch default), got {self.num_threads}")
        _check_choice("train.critic_schedule", self.critic_schedule, list(CRITIC_SCHEDULES))
        _check_range("train.critic_threshold", self.critic_threshold, 0.0, 1.0)
        if self.critic_ceiling != -1:
            _check_range("train.critic_ceiling", self.critic_ceiling, 0.0, 1.0)
        if 0 < self.critic_ceiling <= self.critic_threshold:
            _fail(
                "train.critic_ceiling",
                f"{self.critic_ceiling} is not above train.critic_threshold "
                f"({self.critic_threshold}): the schedule would step up and down at once; "
                "raise it, set -1 (the threshold + 0.05) or 0 (off)",
            )
        if isinstance(self.critic_max, bool) or self.critic_max < -1:
            _fail("train.critic_max", f"must be -1 (the default rule), 0 (no cap) or a number "
                  f"of discriminator steps >= 1, got {self.critic_max!r}")  # fmt: skip
        _check_range("train.critic_beta", self.critic_beta, 0.0, 0.9999)
        if self.critic_grace < 0:
            _fail("train.critic_grace", f"must be >= 0, got {self.critic_grace}")
        if self.mode_seeking < 0:
            _fail("train.mode_seeking", f"must be >= 0 (0 = off), got {self.mode_seeking}")
        _check_choice("train.lr_schedule", self.lr_schedule, ["constant", "cosine"])
        for policy in self.diff_augment_policies:
            _check_choice("train.diff_augment", policy, list(DIFF_AUGMENT_POLICIES))
        _check_range("train.lr_final", self.lr_final, 0.0, 1.0)
        if not 1 <= self.diff_augment_views <= 16:
            _fail("train.diff_augment_views", f"must be in 1..16, got {self.diff_augment_views}")
        if self.diff_augment_views > 1 and not self.diff_augment_policies:
            _fail(
                "train.diff_augment_views",
                "views are DiffAugment draws: set train.diff_augment (e.g. translation), "
                "or leave the views at 1",
            )
        if self.embedding_weight < 0 and self.embedding_weight != -1:
            _fail(
                "train.embedding_weight",
                f"must be >= 0 (0 = off), or -1 for the default rule, got {self.embedding_weight}",
            )
        if not 2 <= self.embedding_features <= 100_000 or self.embedding_features % 2:
            _fail(
                "train.embedding_features",
                f"must be an even number in 2..100000, got {self.embedding_features}",
            )
        if self.embedding_bandwidth < 0:
            _fail(
                "train.embedding_bandwidth",
                f"must be >= 0 (0 = 0.15 x sqrt(pixels)), got {self.embedding_bandwidth}",
            )
        if self.d_steps_per_round < 0:
            _fail(
                "train.d_steps_per_round",
                f"must be >= 0 (0 = local_steps x n_critic), got {self.d_steps_per_round}",
            )

    @property
    def diff_augment_policies(self) -> tuple[str, ...]:
        """``diff_augment`` as a tuple of policy names (empty: off)."""
        return tuple(p.strip() for p in self.diff_augment.split(",") if p.strip())

    def lr_for(self, network: str) -> float:
        """The configured learning rate of a network by name: ``lr_g`` for a generator (the
        image-to-image tasks' ``generator_ba`` too), ``lr_d`` for any other."""
        return self.lr_g if network.startswith("generator") else self.lr_d


#: Precisions the weights may travel in (``federation.message_dtype``).
MESSAGE_DTYPES = ("float32", "float16", "bfloat16")
SERVER_NETWORKS = ("all", "generator")
OPTIMIZER_STATES = ("keep", "reset")


@dataclass(frozen=True)
class FederationSection:
    """Rounds, hospitals and the server's aggregation strategy.

    Attributes:
        num_hospitals: Simulated hospitals (SuperNodes) in a simulation.
        num_rounds: Federated rounds.
        strategy: Registered aggregation strategy (see ``fedgan.federated.strategies``).
        fraction_train: Share of hospitals sampled each round.
        min_hospitals: The quorum: fewest connected hospitals a round starts with, and fewest
            that must connect at the start (0 = half of ``num_hospitals``, rounded up). A round
            goes on with the hospitals connected when it starts, so one site that goes down
            never stalls the study.
        proximal_mu: ``fedprox``: weight of the proximal term ``mu/2 ||w - w_global||^2`` that
            every hospital adds to each network's local objective.
        server_lr: Server learning rate (eta) of ``fedadam``, ``fedyogi`` and ``fedadagrad``.
        server_tau: Adaptivity (tau) of ``fedadam``, ``fedyogi`` and ``fedadagrad``.
        avgm_lr: ``fedavgm``: server learning rate applied to the averaged update.
        avgm_momentum: ``fedavgm``: server momentum (0 = plain FedAvg with ``avgm_lr``).
        trim_beta: ``fedtrimmedavg``: share of the highest and of the lowest values cut per
            coordinate.
        malicious_hospitals: ``krum``, ``multikrum``, ``bulyan``: how many hospitals may be
            Byzantine (Krum needs more than 2 f + 2 hospitals a round, Bulyan 4 f + 3).
        krum_select: ``multikrum``: how many of the best-scored updates are averaged.
        max_update_ratio: A hospital's reply is rejected when its update's norm exceeds this
            many times the round's median (0: no bound). Replies whose keys, shapes or values
            (NaN, inf) are wrong are always rejected.
        round_timeout: The round's deadline: seconds the server waits for replies; hospitals
            that have not replied by then are recorded as missing and the round is aggregated
            from the others.
        connect_timeout: Seconds the server waits at the start for enough hospitals to connect.
        message_dtype: Precision the weights travel in: ``float32``, or ``float16`` /
            ``bfloat16`` for half the bytes (hospitals train and the server aggregates in
            float32 either way; see ``fedgan.federated.records`` for the rounding bound).
        pack_messages: Send all of a message's weights as one array (Flower sends each array
            as its own request; a deployed round spends less time in transfers). Messages of
            ``privacy.mode: central-dp`` travel per array: Flower's clipping reads them.
        concurrent_hospitals: In a simulation, how many hospitals train at the same time (one
            worker process each); 0 means one per CPU core.
        server_networks: Which networks the server optimizer of ``fedavgm``, ``fedadam``,
            ``fedyogi`` and ``fedadagrad`` steps: ``all``, or ``generator`` (the generators
            take the server step, the discriminators are plainly averaged). Buffers such as
            BatchNorm's running statistics are always averaged, never stepped.
        share_discriminator: The discriminators are averaged every this many rounds (1: every
            round; 0: never, so each hospital keeps and trains its own discriminator and it
            never leaves the site). Between averages each hospital trains the one it kept.
        local_norm: FedBN for the discriminators: their normalisation layers (BatchNorm,
            GroupNorm: affine weights and running statistics) stay at each hospital and are
            never sent or averaged. The generator's always travel, since the coordinator
            evaluates and keeps the global generator.
        optimizer_state: ``keep``: each hospital's Adam moments carry over from its previous
            round; ``reset``: a network whose weights the server replaced starts the round with
            fresh moments (a network the hospital kept keeps its own).
    """

    num_hospitals: int = 4
    num_rounds: int = 10
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    min_hospitals: int = 0
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    server_tau: float = 1e-3
    avgm_lr: float = 1.0
    avgm_momentum: float = 0.0
    trim_beta: float = 0.2
    malicious_hospitals: int = 0
    krum_select: int = 1
    max_update_ratio: float = 10.0
    round_timeout: float = 600.0
    connect_timeout: float = 60.0
    message_dtype: str = "float32"
    pack_messages: bool = True
    concurrent_hospitals: int = 0
    server_networks: str = "all"
    share_discriminator: int = 1
    local_norm: bool = False
    optimizer_state: str = "keep"

    def __post_init__(self) -> None:
        _check_positive("federation.num_hospitals", self.num_hospitals)
        _check_positive("federation.num_rounds", self.num_rounds)
        if not (0.0 < self.fraction_train <= 1.0):
            _fail("federation.fraction_train", f"must be in (0, 1], got {self.fraction_train}")
        if self.min_hospitals < 0:
            _fail("federation.min_hospitals", f"must be >= 0, got {self.min_hospitals}")
        if self.proximal_mu < 0:
            _fail("federation.proximal_mu", f"must be >= 0, got {self.proximal_mu}")
        _check_positive("federation.server_lr", self.server_lr)
        _check_positive("federation.server_tau", self.server_tau)
        _check_positive("federation.avgm_lr", self.avgm_lr)
        _check_range("federation.avgm_momentum", self.avgm_momentum, 0.0, 0.999)
        if not (0.0 <= self.trim_beta < 0.5):
            _fail("federation.trim_beta", f"must be in [0, 0.5), got {self.trim_beta}")
        if self.malicious_hospitals < 0:
            _fail("federation.malicious_hospitals", f"must be >= 0, got {self.malicious_hospitals}")
        _check_positive("federation.krum_select", self.krum_select)
        if self.max_update_ratio < 0 or 0 < self.max_update_ratio < 1:
            _fail(
                "federation.max_update_ratio",
                f"must be 0 (no bound) or >= 1, got {self.max_update_ratio}",
            )
        _check_positive("federation.round_timeout", self.round_timeout)
        _check_positive("federation.connect_timeout", self.connect_timeout)
        if self.message_dtype not in MESSAGE_DTYPES:
            _fail(
                "federation.message_dtype",
                f"must be one of {', '.join(MESSAGE_DTYPES)}, got {self.message_dtype!r}",
            )
        if self.concurrent_hospitals < 0:
            _fail(
                "federation.concurrent_hospitals",
                f"must be >= 0 (0: one per CPU core), got {self.concurrent_hospitals}",
            )
        if self.server_networks not in SERVER_NETWORKS:
            _fail(
                "federation.server_networks",
                f"must be one of {', '.join(SERVER_NETWORKS)}, got {self.server_networks!r}",
            )
        if self.share_discriminator < 0:
            _fail(
                "federation.share_discriminator",
                f"must be >= 0 (0: never, 1: every round), got {self.share_discriminator}",
            )
        if self.optimizer_state not in OPTIMIZER_STATES:
            _fail(
                "federation.optimizer_state",
                f"must be one of {', '.join(OPTIMIZER_STATES)}, got {self.optimizer_state!r}",
            )

    @property
    def keeps_local(self) -> bool:
        """Some weights stay at the hospitals between rounds (a local discriminator between
        averages, or FedBN's normalisation layers)."""
        return self.local_norm or self.share_discriminator != 1

    @property
    def sampled(self) -> int:
        """Hospitals a round trains when all are connected: the sampled share of them."""
        return max(1, math.ceil(self.fraction_train * self.num_hospitals))

    @property
    def quorum(self) -> int:
        """The fewest hospitals a round goes on with: ``min_hospitals``, or half of them."""
        return self.min_hospitals or max(1, math.ceil(self.num_hospitals / 2))


PRIVACY_MODES = ("none", "dp-sgd", "central-dp")


@dataclass(frozen=True)
class PrivacySection:
    """Differential privacy.

    ``dp-sgd`` (sample-level, per hospital): Opacus DP-SGD on the discriminator; the generator
    learns only through it, so it is private by post-processing. ``central-dp`` (hospital-level,
    Flower's fixed-clipping wrappers): meaningful only with many hospitals per round.

    Attributes:
        mode: ``none``, ``dp-sgd`` or ``central-dp``.
        target_epsilon: The budget every hospital must stay within (required for ``dp-sgd``
            and ``central-dp``).
        noise_multiplier: Fixed noise (sigma); 0 calibrates it to ``target_epsilon`` over the
            whole planned training (rounds x local steps). With a fixed sigma a hospital stops
            training before the round that would exceed its budget.
        delta: Target delta; 0 means 1/(10 n) capped at 1e-5 (n: the hospital's images, or the
            number of hospitals for ``central-dp``). A delta of 1/n or more is refused
            (pre-flight, and under ``dp-sgd`` by each hospital for its own n, under
            ``central-dp`` by the server for the hospitals).
        max_grad_norm: Per-sample (``dp-sgd``) or per-hospital update (``central-dp``) clip norm.
        accountant: ``prv`` (default; Gopi et al. 2021, Opacus's own default: for the same
            epsilon it needs 5-9 % less noise than RDP's bound) or ``rdp``. Either way a
            calibrated sigma is remembered in the hospital's accountant state.
        secure_mode: Cryptographically secure noise (Opacus ``secure_mode``) for production.
        central_clipping: ``server`` or ``client``-side fixed clipping for ``central-dp``.
        grad_sample_mode: How each pair's gradient is clipped: ``ghost`` (paired ghost
            clipping, ``fedgan.privacy.ghost``: the fastest, Conv2d/Linear plus every layer Opacus
            has a per-sample gradient for), ``ew`` (PyTorch's ExpandedWeights through Opacus) or
            ``hooks`` (Opacus hooks). All give the same update.
        max_physical_batch: With ``ghost``, the most real/fake pairs one forward and backward
            of the discriminator holds: a larger Poisson batch runs in parts whose clipped
            gradients add up before the one noisy step (the same update, bounded memory, as
            Opacus's BatchMemoryManager). 0: the whole batch at once.
        embedding_noise: With ``train.embedding_weight`` under ``dp-sgd``: the noise of the
            embedding's one release, as a multiple of its sensitivity (a sum of unit-norm
            feature vectors: adding or removing one image moves it by at most 1). The release
            is composed with the DP-SGD steps in the hospital's accountant, and sigma is
            calibrated so that both together stay within ``target_epsilon``. 0 takes
            ``20 / target_epsilon``: 2 at epsilon 10, which raises the DP-SGD sigma by about
            1 % (PneumoniaMNIST's plan under PRV), and 6.7 at epsilon 3.
    """

    mode: str = "none"
    target_epsilon: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    secure_mode: bool = False
    central_clipping: str = "server"
    grad_sample_mode: str = "ghost"
    max_physical_batch: int = 0
    embedding_noise: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("privacy.mode", self.mode, list(PRIVACY_MODES))
        _check_choice("privacy.accountant", self.accountant, ["prv", "rdp"])
        _check_choice("privacy.central_clipping", self.central_clipping, ["client", "server"])
        _check_choice("privacy.grad_sample_mode", self.grad_sample_mode, ["ew", "ghost", "hooks"])
        if self.target_epsilon < 0 or self.noise_multiplier < 0:
            _fail("privacy.target_epsilon", "epsilon and noise_multiplier must be >= 0")
        if self.mode != "none" and not self.target_epsilon > 0:
            _fail(
                "privacy.target_epsilon",
                f"mode {self.mode!r} needs a budget: set privacy.target_epsilon > 0 (e.g. 3.0)",
            )
        _check_range("privacy.delta", self.delta, 0.0, 0.1)
        _check_positive("privacy.max_grad_norm", self.max_grad_norm)
        if self.embedding_noise < 0:
            _fail(
                "privacy.embedding_noise",
                f"must be >= 0 (0 = 20 / target_epsilon), got {self.embedding_noise}",
            )
        if self.max_physical_batch < 0:
            _fail("privacy.max_physical_batch", f"must be >= 0, got {self.max_physical_batch}")
        if self.max_physical_batch and self.grad_sample_mode != "ghost":
            _fail(
                "privacy.max_physical_batch",
                "physical batches add up paired ghost clipping's sums; set "
                "privacy.grad_sample_mode=ghost or privacy.max_physical_batch=0",
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class EvalSection:
    """Central evaluation of the global generator on the server.

    Attributes:
        every: Evaluate (sample grid, ``metrics``) every this many rounds; the last round always.
        grid_size: Images in the fixed-noise sample grid.
        metrics: Comma-separated registered metrics computed every ``every`` rounds (the cheap
            domain-feature set by default: it runs in seconds on CPU).
        final_metrics: Metrics computed once more at the last round (Inception ``fid_2k`` and
            ``kid_2k`` cost minutes on CPU; add them here or run ``fedgan evaluate``).
        inception_weights: Local file of the FID Inception weights; empty downloads them.
        lpips_weights: A folder holding LPIPS's weights (torchvision's
            ``vgg16-397923af.pth`` and piq's ``lpips_weights.pt``); ``download`` fetches
            them; empty leaves LPIPS out of the image-to-image metrics.
        cache_dir: Where extractor weights and real-data features are cached; empty means
            ``<run.output_dir>/.cache``.
        use_training_images: Let the server read the simulated hospitals' training images for
            memorization checks (a deployed server never has them: set false there).
        background: Evaluate in a separate process while the next round trains (at the
            low CPU priority; the same metrics as evaluating in line). False evaluates on
            the round's path, as the centralized and federated runs did before.
        select: A validation figure of ``metrics`` (e.g. ``anomaly_val_auc``) that chooses
            the run's best round: ``checkpoints/best`` names it, ``summary.json`` reports its
            evaluation beside the last one, and ``fedgan detect`` applies it. Only keys
            measured on held-out images that the test figures never see may choose, so the
            chosen round's test figures stay honest. Empty keeps the last round only.
        average_rounds: The weights a round releases (its checkpoint's ``state``: what is
            evaluated, selected, and what ``fedgan detect``, ``sample``, ``audit`` and a
            warm start read) are the mean of the global weights of the last this many
            rounds, round 0's random start left out; 1: the round's own. Training goes on
            from the round's own weights (kept as the checkpoint's ``train_state``), so the
            average changes no round's training and costs no privacy (post-processing).
            A detector whose test AUC swings between evaluations steadies with it
            (``simulations/README.md``, study 32).
    """

    every: int = 1
    grid_size: int = 64
    metrics: str = "domain_fd_1k,domain_kd_1k,domain_prdc_1k,ms_ssim_diversity"
    final_metrics: str = "memorization_1k,tstr_auc"
    inception_weights: str = ""
    lpips_weights: str = ""
    cache_dir: str = ""
    use_training_images: bool = True
    background: bool = True
    select: str = ""
    average_rounds: int = 1

    def __post_init__(self) -> None:
        _check_positive("eval.every", self.every)
        if isinstance(self.average_rounds, bool) or not 1 <= self.average_rounds <= 100:
            _fail(
                "eval.average_rounds",
                f"must be an integer in 1..100 (rounds), got {self.average_rounds!r}",
            )
        _check_positive("eval.grid_size", self.grid_size)
        for key in ("metrics", "final_metrics"):
            names = metric_names(getattr(self, key))
            if len(set(names)) != len(names):
                _fail(f"eval.{key}", f"names a metric twice: {getattr(self, key)!r}")

    @property
    def metric_list(self) -> list[str]:
        """``metrics`` as a list of names."""
        return metric_names(self.metrics)

    @property
    def final_metric_list(self) -> list[str]:
        """``final_metrics`` as a list of names."""
        return metric_names(self.final_metrics)


def metric_names(text: str) -> list[str]:
    """``"a, b"`` -> ``["a", "b"]`` (names are checked against the registry by
    ``fedgan.experiment.resolve``)."""
    return [n.strip() for n in text.split(",") if n.strip()]


@dataclass(frozen=True)
class TaskSection:
    """What the GAN learns: new images (``synthesis``) or an image-to-image mapping.

    Attributes:
        name: ``synthesis`` (the GAN families of ``model.family``), ``enhance`` (pix2pix:
            U-Net generator, PatchGAN discriminator, adversarial + L1), ``super-resolution``
            (SRGAN/ESRGAN-style residual generator with pixel-shuffle upsampling) or
            ``translate`` (CycleGAN between two domains), ``inpaint`` (fill masked holes:
            U-Net given the image with its hole and the mask, PatchGAN, adversarial + L1) or
            ``anomaly`` (f-AnoGAN: a GAN of healthy images, ``data.train_label``, plus an
            encoder into its latent space; abnormal regions are what it cannot reconstruct).
        degradation: ``enhance``: how clean images become inputs: ``noise`` (low-dose-like:
            Poisson photon noise plus Gaussian read noise), ``blur``, or ``noise+blur``.
        noise_sigma: Gaussian read-noise std (images in [0, 1]).
        photons: Poisson photon count per unit intensity (lower = noisier; 0 = none).
        blur_sigma: Gaussian blur sigma in pixels at 32 px (scaled with the size).
        scale: ``super-resolution`` factor: 2 or 4 (inputs are ``image_size / scale``).
        l1_weight: Weight of the pixel L1 loss against the adversarial one.
        adversarial_weight: Weight of the adversarial loss of the generator.
        perceptual: ``super-resolution`` feature loss: ``discriminator`` (matching the
            discriminator's features; no downloaded weights), ``vgg`` (VGG-19 features from
            ``vgg_weights``), or ``none``.
        perceptual_weight: Weight of the feature loss.
        vgg_weights: A local torchvision VGG-19 state dict (``.pth``) for ``perceptual: vgg``.
        relativistic: ``super-resolution``: relativistic average adversarial loss (ESRGAN).
        target: ``translate``: the second domain; ``mr-contrast`` renders every image with an
            MR-like tissue contrast (so the translation has a ground truth).
        cycle_weight: ``translate``: cycle-consistency weight.
        identity_weight: ``translate``: identity-loss weight.
        hole: ``inpaint``: the shape of the seeded holes: ``box`` (one rectangle), ``stroke``
            (an irregular brush stroke), or ``mixed`` (either, half the images each).
        hole_fraction: ``inpaint``: the share of each image's pixels a hole covers (a stroke
            covers exactly ``round(hole_fraction * size**2)`` pixels; a box the nearest
            rectangle of sides at most one pixel apart).
        fill_prior: ``inpaint``: what the generator starts from: ``none`` (the hole at
            mid-grey; the U-Net draws the whole fill) or ``biharmonic`` (the hole filled by
            biharmonic inpainting, the classical baseline, and the U-Net learns a correction to
            it from zero).
        feature_weight: ``anomaly``: kappa, the weight of the discriminator-feature residual
            beside the image residual, in the encoder's loss and the anomaly score.
        map_shift: ``anomaly``: the shift-tolerant anomaly map offered beside the plain
            ``|x - G(E(x))|``: each pixel's smallest residual over shifts of the
            reconstruction by up to this many pixels (0: the plain map only). A GAN that
            misses an organ's edge by a pixel then leaves no residual along it, and a lesion
            it cannot draw still stands out. Every method, fedgan and the baselines, is
            scored with both maps at each evaluation and keeps the one that scores better on
            validation images (``anomaly_map_shift``); ``fedgan detect`` draws that one.
    """

    name: str = "synthesis"
    degradation: str = "noise"
    noise_sigma: float = 0.05
    photons: float = 200.0
    blur_sigma: float = 1.0
    scale: int = 4
    l1_weight: float = 100.0
    adversarial_weight: float = 1.0
    perceptual: str = "discriminator"
    perceptual_weight: float = 1.0
    vgg_weights: str = ""
    relativistic: bool = True
    target: str = "mr-contrast"
    cycle_weight: float = 10.0
    identity_weight: float = 5.0
    hole: str = "mixed"
    hole_fraction: float = 0.15
    fill_prior: str = "none"
    feature_weight: float = 1.0
    map_shift: int = 0

    def __post_init__(self) -> None:
        _check_choice("task.degradation", self.degradation, ["noise", "blur", "noise+blur"])
        _check_choice("task.hole", self.hole, ["box", "stroke", "mixed"])
        _check_choice("task.fill_prior", self.fill_prior, ["none", "biharmonic"])
        if not 0 < self.hole_fraction <= 0.5:
            _fail("task.hole_fraction", f"must be in (0, 0.5], got {self.hole_fraction}")
        _check_choice("task.perceptual", self.perceptual, ["discriminator", "vgg", "none"])
        _check_choice("task.target", self.target, ["mr-contrast"])
        if not 0 <= self.map_shift <= 3:
            _fail("task.map_shift", f"must be an integer in 0..3 (pixels), got {self.map_shift}")
        if self.scale not in (2, 4):
            _fail("task.scale", f"must be 2 or 4, got {self.scale}")
        for key in (
            "noise_sigma",
            "photons",
            "blur_sigma",
            "l1_weight",
            "adversarial_weight",
            "perceptual_weight",
            "cycle_weight",
            "identity_weight",
            "feature_weight",
        ):
            if getattr(self, key) < 0:
                _fail(f"task.{key}", f"must be >= 0, got {getattr(self, key)}")
        if self.perceptual == "vgg" and not self.vgg_weights:
            _fail(
                "task.vgg_weights",
                "perceptual: vgg needs a local VGG-19 state dict (torchvision's "
                "vgg19-dcbb9e9d.pth); set task.vgg_weights=PATH or use perceptual: discriminator",
            )


@dataclass(frozen=True)
class Config:
    """A whole experiment. Build it with :func:`load_config` or :func:`from_run_config`, then
    check it as a whole with ``fedgan.experiment.resolve`` (registered names, rules between
    sections): each section here checks only its own fields, and this module imports nothing
    of fedgan."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    federation: FederationSection = field(default_factory=FederationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    eval: EvalSection = field(default_factory=EvalSection)
    task: TaskSection = field(default_factory=TaskSection)

    @property
    def run_dir(self) -> Path:
        """The run's directory, ``<run.output_dir>/<run.name>``."""
        return Path(self.run.output_dir) / self.run.name


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}


def _field_types(section: type) -> dict[str, type]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in fields(section)}


def _coerce(key: str, value: Any, kind: type) -> Scalar:
    """Checks ``value`` against a field's type; ints are accepted where floats are expected."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        _fail(key, f"expected true or false, got {value!r}")
    if kind in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any numeric text.
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            _fail(key, f"expected a number, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, f"expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                _fail(key, f"expected a finite number, got {value!r}")
            return float(value)
        _fail(key, f"expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        _fail(key, f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {kind!r} for {key!r}")


def from_dict(data: Mapping[str, Any]) -> Config:
    """Builds a validated :class:`Config` from a nested mapping (as read from YAML).

    Raises:
        ValueError: On an unknown section or key (the message lists the allowed ones) or a
            value of the wrong type or range.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping of sections, got {type(data).__name__}")
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ValueError(
            f"unknown config section(s) {sorted(unknown)}; allowed: {', '.join(SECTIONS)}"
        )
    sections: dict[str, Any] = {}
    for name, section_type in SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, Mapping):
            _fail(name, f"expected a mapping of keys, got {values!r}")
        types_ = _field_types(section_type)
        bad = set(values) - set(types_)
        if bad:
            key = f"{name}.{sorted(bad)[0]}"
            _fail(key, f"unknown key; allowed in {name!r}: {', '.join(types_)}")
        kwargs = {k: _coerce(f"{name}.{k}", v, types_[k]) for k, v in values.items()}
        sections[name] = section_type(**kwargs)
    return Config(**sections)


def to_dict(config: Config) -> dict[str, dict[str, Scalar]]:
    """The nested plain-dict form of ``config`` (what ``config.yaml`` holds)."""
    return dataclasses.asdict(config)


def to_run_config(config: Config) -> dict[str, Scalar]:
    """Flattens ``config`` into Flower's run-config: ``{"section.key": scalar}``."""
    return {
        f"{section}.{key}": value
        for section, values in to_dict(config).items()
        for key, value in values.items()
    }


def from_run_config(run_config: Mapping[str, Any]) -> Config:
    """Rebuilds a :class:`Config` from Flower's flat run-config (the inverse of
    :func:`to_run_config`); keys missing from ``run_config`` take their defaults."""
    nested: dict[str, dict[str, Any]] = {}
    for flat_key, value in run_config.items():
        section, sep, key = flat_key.partition(".")
        if not sep:
            raise ValueError(
                f"run-config key {flat_key!r} is not of the form 'section.key'; "
                f"sections: {', '.join(SECTIONS)}"
            )
        nested.setdefault(section, {})[key] = value
    return from_dict(nested)


def parse_override(text: str) -> tuple[str, Any]:
    """Parses one ``--set section.key=value`` (the value is read as YAML: ``3``, ``true``,
    ``0.5``, ``name``)."""
    key, sep, raw = text.partition("=")
    if not sep or "." not in key:
        raise ValueError(
            f"override {text!r} must look like section.key=value (e.g. train.lr_g=1e-4)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ValueError(
            f"override {text!r}: the value is not valid YAML; quote it (key='text')"
        ) from None
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of the nested ``data`` with each ``section.key=value`` applied."""
    merged: dict[str, Any] = {}
    for name, values in data.items():
        if values is not None and not isinstance(values, Mapping):
            _fail(str(name), f"expected a mapping of keys, got {values!r}")
        merged[name] = dict(values or {})
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        merged.setdefault(section, {})[name] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML experiment (or the defaults when ``path`` is None) and applies overrides.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: On unknown keys or bad values (see :func:`from_dict`).
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(Path(path), "config file", "see configs/ for examples", "sections")
    return from_dict(apply_overrides(data, overrides or []))


def read_yaml_mapping(path: Path, what: str, where_to_look: str, holding: str) -> dict[str, Any]:
    """The top-level mapping of the YAML file ``path`` (``{}`` when it is empty): an experiment
    config, or a study plan.

    Args:
        path: The file.
        what: What the file is, for the messages ("config file").
        where_to_look: Where examples are, for the messages.
        holding: What the top-level mapping holds, for the messages ("sections").

    Raises:
        FileNotFoundError: If ``path`` does not exist or is a folder.
        ValueError: If it is not text, not valid YAML, or not a mapping at the top level.
    """
    if path.is_dir():
        raise FileNotFoundError(
            f"{what} {str(path)!r} is a folder; name a YAML file in it ({where_to_look})"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} not found ({where_to_look})")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file; give a YAML {what} ({where_to_look})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "not valid YAML"
        raise ValueError(f"{path}:{where}: {problem}; fix the YAML syntax there") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(
            f"{path}: expected a mapping of {holding} at the top level, got a "
            f"{type(loaded).__name__} ({where_to_look})"
        )
    return loaded or {}


def dump_yaml(config: Config) -> str:
    """The YAML text of ``config`` (sections in declaration order)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def with_changes(config: Config, **sections: Mapping[str, Any]) -> Config:
    """Returns ``config`` with some keys of some sections replaced, validated again."""
    updated = {}
    for name, changes in sections.items():
        updated[name] = replace(getattr(config, name), **changes)
    return replace(config, **updated)


__all__ = [
    "Config",
    "DataSection",
    "EvalSection",
    "FederationSection",
    "ModelSection",
    "PrivacySection",
    "RunSection",
    "TaskSection",
    "TrainSection",
    "apply_overrides",
    "dump_yaml",
    "from_dict",
    "from_run_config",
    "load_config",
    "to_dict",
    "to_run_config",
    "with_changes",
]
