"""What travels each round: the weights the server sends, the weights a hospital returns, and
the weights that stay at the hospital (a local discriminator, FedBN's normalisation layers).

The server and every hospital compute the same plan from the run's config and the absolute
round number, so no list of keys travels. Flower-free.

With ``federation.share_discriminator = k >= 1`` the discriminators are returned and averaged
on rounds ``r`` with ``r % k == 0`` and sent at the start of the round after each average
(``(r - 1) % k == 0``, round 1 included), so that every hospital resumes from the average it
contributed to; between averages each hospital trains the discriminator it kept. With ``k = 0``
they are never sent nor returned. With ``local_norm`` (FedBN, Li et al. 2021) the
discriminators' normalisation layers are never sent nor returned. The generators' always
travel: the generator is what the coordinator takes away and evaluates, and one whose
BatchNorm statistics stayed at the hospitals would be evaluated with its initial ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedgan.models import ModelKeys

if TYPE_CHECKING:
    from fedgan.config import Config, FederationSection


def is_discriminator(network: str) -> bool:
    """Discriminators of every task (``discriminator``, ``discriminator_a``, ...)."""
    return network.startswith("discriminator")


@dataclass(frozen=True)
class SharingPlan:
    """Which keys travel in which round (see the module docstring)."""

    keys: ModelKeys
    share_discriminator: int = 1
    local_norm: bool = False

    @classmethod
    def from_config(cls, fed: FederationSection, keys: ModelKeys) -> SharingPlan:
        return cls(keys, fed.share_discriminator, fed.local_norm)

    @property
    def shares_everything(self) -> bool:
        """Every key is sent and returned every round (plain federated averaging)."""
        return self.share_discriminator == 1 and not self.local_norms

    def _select(self, discriminator_travels: bool) -> frozenset[str]:
        chosen: set[str] = set()
        for network, keys in self.keys.networks.items():
            if is_discriminator(network) and not discriminator_travels:
                continue
            chosen |= keys
        return frozenset(chosen - self.local_norms)

    @property
    def local_norms(self) -> frozenset[str]:
        """The normalisation keys FedBN keeps at the hospitals (the discriminators')."""
        if not self.local_norm:
            return frozenset()
        keys = self.keys
        return frozenset(k for k in keys.norms if is_discriminator(keys.network_of(k)))

    def sent(self, round_: int) -> frozenset[str]:
        """Keys the server sends at the start of absolute round ``round_`` (from 1)."""
        k = self.share_discriminator
        return self._select(k > 0 and (round_ - 1) % k == 0)

    def returned(self, round_: int) -> frozenset[str]:
        """Keys each hospital returns (and the server averages) at the end of ``round_``."""
        k = self.share_discriminator
        return self._select(k > 0 and round_ % k == 0)

    @property
    def never_shared(self) -> frozenset[str]:
        """Keys that never leave a hospital."""
        k = self.share_discriminator
        rounds = range(1, max(k, 1) + 2)
        travel = frozenset().union(*(self.sent(r) | self.returned(r) for r in rounds))
        return self.keys.all - travel


def sharing_plan(cfg: Config) -> SharingPlan:
    """The plan of ``cfg``'s federation for ``cfg``'s model (its networks are built once)."""
    from fedgan.training import networks_for

    return SharingPlan.from_config(cfg.federation, ModelKeys.of(networks_for(cfg)))
