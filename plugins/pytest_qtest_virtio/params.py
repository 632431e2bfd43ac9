"""Pure logic of the plugin: the parametrisation of virtio_device tests.

No pytest and no QEMU here, so it is unit-tested directly; plugin.py adapts it to pytest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qtest_virtio import modes
from qtest_virtio.app.options import OptionError, parse_transports

RINGS = modes.RINGS
#: Modes whose register layout can negotiate RING_PACKED (bit 34 needs the 64-bit features).
PACKED_MODES = frozenset(modes.MODERN_LAYOUT_MODES)
#: Marker kwargs that place the device (a pcie-root-port of q35, an -object iothread, plugged
#: after start): bools.
PLACEMENT_KWARGS = ("pcie_root_port", "iothread", "hotplug")


@dataclass(frozen=True)
class VirtioParam:
    """One parametrisation of a virtio_device test: the device, its mode and flags."""

    device: str
    mode: str
    ring: str
    #: Device properties: the option's and the marker's, plus packed=on for the packed ring.
    flags: tuple[tuple[str, str], ...] = ()
    refuse: frozenset[str] = frozenset()
    #: Flags that vary between runs (option-given and the ring), shown in the test id.
    id_flags: tuple[tuple[str, str], ...] = ()
    #: Why this combination cannot run, decided before QEMU starts ("" when it can).
    skip: str = ""
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)
    #: Refusals that come from the option (those of the marker are the same in every run).
    id_refuse: frozenset[str] = frozenset()
    #: A run added by --virtio-refuse-each (one feature refused on its own).
    refuse_each: bool = False

    @property
    def id(self) -> str:
        parts = [self.device, self.mode] + [f"{k}={v}" for k, v in self.id_flags]
        if self.id_refuse:
            parts.append("refuse=" + "+".join(sorted(self.id_refuse)))
        return "-".join(parts)

    @property
    def flag_dict(self) -> dict[str, str]:
        return dict(self.flags)


def virtio_params(
    device: str,
    *,
    selected_modes: tuple[str, ...],
    option_flags: Mapping[str, str],
    option_refuse: frozenset[str],
    marker_kwargs: Mapping[str, Any],
    refuse_each: tuple[str, ...] = (),
) -> list[VirtioParam]:
    """Every (mode, ring) a test runs on: the selected modes that the marker allows, split and
    packed rings (packed only where the layout can negotiate it, unless flags force one)."""
    kwargs = dict(marker_kwargs)
    allowed = parse_transports(kwargs.pop("transports", None))
    rings = tuple(kwargs.pop("rings", RINGS))
    bad_rings = [r for r in rings if r not in RINGS]
    if bad_rings:
        raise OptionError(f"virtio_device(rings=...): unknown ring {bad_rings}; valid: split, packed")
    for key in PLACEMENT_KWARGS:
        if not isinstance(kwargs.get(key, False), bool):
            raise OptionError(f"virtio_device({key}={kwargs[key]!r}) takes True or False")
    marker_flags = {k: str(v) for k, v in dict(kwargs.pop("flags", {})).items()}
    marker_refuse = frozenset(kwargs.pop("refuse", ()))
    refuse = option_refuse | marker_refuse
    refuse_each = _marker_refuse_each(kwargs.pop("refuse_each", None), refuse_each)
    forced_packed = option_flags.get("packed")
    params: list[VirtioParam] = []
    for mode in selected_modes:
        if mode not in allowed:
            continue
        for ring in rings:
            flags = {**marker_flags, **option_flags}
            id_flags = dict(option_flags)
            skip = ""
            if forced_packed is not None:
                # The option decides the ring: one run per mode, named by the flag.
                if ring != rings[0]:
                    continue
                ring = "packed" if forced_packed == "on" else "split"
                if ring == "packed" and mode not in PACKED_MODES:
                    skip = f"packed=on needs the modern register layout; mode {mode} drives the legacy one"
                elif ring not in rings:
                    skip = f"this scenario is for {'/'.join(rings)} rings only; packed={forced_packed} forces {ring}"
            elif ring == "packed":
                if mode not in PACKED_MODES:
                    continue
                flags["packed"] = "on"
                id_flags["packed"] = "on"
            params.append(
                VirtioParam(
                    device=device,
                    mode=mode,
                    ring=ring,
                    flags=tuple(flags.items()),
                    refuse=refuse,
                    id_flags=tuple(id_flags.items()),
                    skip=skip,
                    extra=tuple(kwargs.items()),
                    id_refuse=option_refuse,
                )
            )
    # Each feature refused on its own (issue 4): one extra run per feature, on the layout that
    # can negotiate them all (modern, split), unless the marker keeps the test off it.
    if refuse_each and modes.MODERN in selected_modes and modes.MODERN in allowed and "split" in rings:
        base = {**marker_flags, **option_flags}
        for feature in refuse_each:
            if feature in refuse:
                continue
            params.append(
                VirtioParam(
                    device=device,
                    mode=modes.MODERN,
                    ring="split",
                    flags=tuple(base.items()),
                    refuse=refuse | {feature},
                    id_flags=tuple(option_flags.items()),
                    extra=tuple(kwargs.items()),
                    id_refuse=option_refuse | {feature},
                    refuse_each=True,
                )
            )
    return params


def _marker_refuse_each(wanted: object, offered: tuple[str, ...]) -> tuple[str, ...]:
    """The marker's ``refuse_each=``: None (every feature the driver implements), False (none:
    the scenario's path does not depend on any optional feature), or the feature names whose
    refusal changes what the scenario checks. Names outside the driver's are a usage error."""
    if wanted is None or not offered:
        return offered
    if wanted is False:
        return ()
    if isinstance(wanted, str) or not isinstance(wanted, (tuple, list, set, frozenset)):
        raise OptionError(f"virtio_device(refuse_each=...): give False or a list of feature names, not {wanted!r}")
    unknown = sorted(set(map(str, wanted)) - set(offered))
    if unknown:
        raise OptionError(
            f"virtio_device(refuse_each=...): {', '.join(unknown)} is no feature this driver can refuse; "
            f"valid: {', '.join(offered)}"
        )
    return tuple(f for f in offered if f in set(map(str, wanted)))
