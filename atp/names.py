"""Structure names: map real-world ROI names to AAPM TG-263 canonical names.

The alias table (``atp/data/tg263_aliases.yaml``, extendable by a user YAML of the same
layout) lists canonical names with their aliases, and *lateral stems* (``Parotid``,
``Lens``, ...) for which ``<stem>_L`` / ``<stem>_R`` exist. :func:`canonical_name`
applies these rules, in this order, and returns the first hit:

1. **Key.** A name is compared through its *key*: lower case with every character
   that is not a letter or digit removed, so case, spaces, underscores, hyphens and
   dots never matter ("Spinal Cord" == "spinal_cord" == "SPINALCORD").
2. **Helper structures** keep their name and are recognised, not translated: a name
   beginning with ``z`` followed by a separator, upper-case letter or digit
   (``zPTV_opt``, ``z_ring``; TG-263's non-dosimetric prefix), or with ``_``, or whose
   key starts with ``ring``, ``opt`` (but not ``optic``) or ``avoid``.
3. **Targets**: ``PTV``/``CTV``/``GTV``/``ITV``, an optional attached sub-type letter
   (``p``, ``n``, ``sb``), an optional dose and optional further words become
   ``<TYPE><sub>[_<dose Gy>][_<Word>...]``: "PTV70", "PTV_7000", "ptv 70", "PTV 70Gy"
   -> ``PTV_70``; "PTV_5425" -> ``PTV_54.25``; "CTVn 56 Gy" -> ``CTVn_56``;
   "PTV high" -> ``PTV_High``; "PTV_boost_66Gy" -> ``PTV_66_Boost`` (the first dose
   found moves next to the type; other words keep their order).
   Dose rule (:func:`target_dose_from_name`): a unit in the name wins (``Gy``/``cGy``);
   otherwise a number with a decimal point is Gy, an integer up to 100 is Gy and an
   integer above 100 is cGy; an integer below 5 right after the type is an index
   ("PTV1"), not a dose. The dose in a canonical name is in Gy without trailing zeros.
4. **Exact alias**: the key is looked up among canonical names and aliases.
5. **Laterality**: a side word at the start or end -- ``L``, ``Lt``, ``Left`` or ``R``,
   ``Rt``, ``Right``, separated or glued on -- is removed and the rest looked up among
   lateral stems: "lparotid", "L Parotid", "Left Parotid", "LeftParotid",
   "parotid lt", "Parotid_L" -> ``Parotid_L``.
6. **PRV margins**: a trailing ``PRV`` with optional mm digits after a name known by
   rules 4-5 gives ``<Organ>_PRV`` or ``<Organ>_PRVnn`` (two-digit mm as in TG-263):
   "Cord PRV 5mm" -> ``SpinalCord_PRV05``.

Anything else is unknown (``None``); importers keep such names as they are.
:func:`role_for` gives the planning role of a canonical name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from atp.errors import InputError, quote
from atp.patient import Role
from atp.yamlio import load_yaml

DEFAULT_ALIAS_FILE = Path(__file__).resolve().parent / "data" / "tg263_aliases.yaml"

_SIDES = {"L": ("left", "lt", "l"), "R": ("right", "rt", "r")}  # longest first
_TARGET_TYPES = ("ptv", "ctv", "gtv", "itv")
_TARGET_SUBTYPES = ("sb", "p", "n")
_CONTROL_KEY_PREFIXES = ("ring", "opt", "avoid")
_TARGET_RE = re.compile(r"^\s*(ptv|ctv|gtv|itv)(sb|p|n)?(?![a-z])(.*)$", re.IGNORECASE)
_DOSE_TOKEN_RE = re.compile(r"^(\d+(?:[.,]\d+)?)(cgy|gy)?$")
_PRV_RE = re.compile(r"^(.*?)[\s_\-]*prv[\s_\-]*(\d{1,2})?\s*(?:mm)?\s*$", re.IGNORECASE)


def name_key(name: str) -> str:
    """Matching key: lower case, letters and digits only."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


@dataclass(frozen=True)
class AliasTable:
    """Alias key -> canonical name, plus lateral stems (key -> stem).

    Build with :meth:`default`, :meth:`load` or :meth:`from_dict`; combine with
    :meth:`merged` (the other table wins where both define a key).
    """

    exact: Mapping[str, str] = field(default_factory=dict)
    lateral: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None

    # --- construction --------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping, source: str | None = None) -> AliasTable:
        """Table from the YAML layout: ``structures``, ``lateral``, ``aliases`` keys."""
        if not isinstance(data, Mapping):
            raise InputError("alias table must be a mapping with 'structures', 'lateral' "
                             "and/or 'aliases'", file=source)
        unknown = set(data) - {"structures", "lateral", "aliases"}
        if unknown:
            raise InputError(f"unknown section(s) {quote(sorted(map(str, unknown)))}; expected "
                             "'structures', 'lateral', 'aliases'", file=source,
                             field=quote(min(map(str, unknown)), repr_=False))
        exact: dict[str, str] = {}
        lateral: dict[str, str] = {}
        for section in ("structures", "lateral"):
            entries = data.get(section) or {}
            if not isinstance(entries, Mapping):
                raise InputError("must map canonical names to lists of aliases",
                                 file=source, field=section)
            for canonical, aliases in entries.items():
                canonical = str(canonical).strip()
                if not canonical or not name_key(canonical):
                    raise InputError("empty canonical name", file=source, field=section)
                if aliases is None:
                    aliases = []
                if isinstance(aliases, str) or not isinstance(aliases, list) or not all(
                        isinstance(a, str) and name_key(a) for a in aliases):
                    raise InputError("aliases must be a list of names (text)", file=source,
                                     field=f"{section}.{quote(canonical, 60, repr_=False)}")
                if section == "structures":
                    for a in [canonical, *aliases]:
                        exact[name_key(a)] = canonical
                else:
                    for a in [canonical, *aliases]:
                        lateral[name_key(a)] = canonical
                    for side in _SIDES:
                        exact[name_key(f"{canonical}_{side}")] = f"{canonical}_{side}"
        flat = data.get("aliases") or {}
        if not isinstance(flat, Mapping):
            raise InputError("must map alias -> canonical name", file=source, field="aliases")
        for alias, canonical in flat.items():
            if not isinstance(alias, str) or not name_key(alias):
                raise InputError("an alias must be a non-empty name", file=source,
                                 field=f"aliases.{quote(alias, 60, repr_=False)}")
            if not isinstance(canonical, str) or not name_key(canonical):
                raise InputError("canonical name must be a non-empty string", file=source,
                                 field=f"aliases.{alias}")
            exact[name_key(alias)] = canonical.strip()
        return cls(exact, lateral, source)

    @classmethod
    def load(cls, path: str | Path) -> AliasTable:
        """Read a YAML alias file (same layout as the shipped TG-263 table)."""
        path = Path(path)
        data = load_yaml(path, what="alias table")
        return cls.from_dict(data or {}, str(path))

    @classmethod
    def default(cls) -> AliasTable:
        """The shipped TG-263 table (cached)."""
        return _default_table()

    def merged(self, other: AliasTable) -> AliasTable:
        """This table extended by ``other``; ``other`` wins on a shared key."""
        exact = dict(self.exact)
        exact.update(other.exact)
        lateral = dict(self.lateral)
        lateral.update(other.lateral)
        return AliasTable(exact, lateral, other.source or self.source)

    # --- lookups -------------------------------------------------------------------
    def lookup(self, name: str) -> str | None:
        """Canonical name of an organ/external name via rules 4-5 (no targets/PRV)."""
        key = name_key(name)
        if not key:
            return None
        hit = self.exact.get(key)
        if hit is not None:
            return hit
        return self._lateral(name, key)

    def _lateral(self, name: str, key: str) -> str | None:
        # separated side word first ("L Parotid", "parotid lt"), then glued ("lparotid")
        words = [w for w in re.split(r"[^a-z0-9]+", _split_camel(name).lower()) if w]
        for side, spellings in _SIDES.items():
            if len(words) > 1:
                if words[0] in spellings:
                    stem = self.lateral.get("".join(words[1:]))
                    if stem:
                        return f"{stem}_{side}"
                if words[-1] in spellings:
                    stem = self.lateral.get("".join(words[:-1]))
                    if stem:
                        return f"{stem}_{side}"
        for side, spellings in _SIDES.items():
            for s in spellings:
                if key.startswith(s) and self.lateral.get(key[len(s):]):
                    return f"{self.lateral[key[len(s):]]}_{side}"
                if key.endswith(s) and self.lateral.get(key[: -len(s)]):
                    return f"{self.lateral[key[: -len(s)]]}_{side}"
        return None

    @property
    def canonical_names(self) -> set[str]:
        return set(self.exact.values())


@lru_cache(maxsize=1)
def _default_table() -> AliasTable:
    return AliasTable.load(DEFAULT_ALIAS_FILE)


def _split_camel(name: str) -> str:
    """'LeftParotid' -> 'Left Parotid' (only at lower->upper boundaries)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)


# --- targets ---------------------------------------------------------------------------
def _format_gy(dose_gy: float) -> str:
    text = f"{dose_gy:.2f}".rstrip("0").rstrip(".")
    return text


def _parse_target(name: str) -> tuple[str, str, float | None, list[str]] | None:
    """(type, subtype, dose Gy or None, other words) or None when not a target name."""
    m = _TARGET_RE.match(name.strip())
    if not m:
        return None
    ttype, sub, rest = m.group(1).upper(), (m.group(2) or "").lower(), m.group(3)
    # words: split on separators and letter<->digit boundaries; keep '70Gy', '54.25', '3mm'
    raw = [w for w in re.split(r"[\s_\-]+", rest) if w]
    tokens: list[str] = []
    for w in raw:
        tokens.extend(t for t in re.findall(r"\d+(?:[.,]\d+)?(?:c?gy|mm|cm)?|[a-z]+",
                                             w, flags=re.IGNORECASE) if t)
    dose = None
    words: list[str] = []
    index: str | None = None
    for i, t in enumerate(tokens):
        low = t.lower()
        dm = _DOSE_TOKEN_RE.match(low)
        if dm and dose is None:
            value = float(dm.group(1).replace(",", "."))
            unit = dm.group(2)
            nxt = tokens[i + 1].lower() if i + 1 < len(tokens) else ""
            if unit is None and nxt in ("gy", "cgy"):
                unit = nxt
            if unit == "cgy":
                dose = value / 100.0
            elif unit == "gy" or "." in dm.group(1) or "," in dm.group(1):
                dose = value
            elif value > 100:
                dose = value / 100.0
            elif value >= 5:
                dose = value
            elif i == 0 and index is None:
                index = dm.group(1)
            else:
                words.append(t)
            continue
        if low in ("gy", "cgy") and dose is not None:
            continue
        words.append(t)
    if dose is not None and not (dose > 0):
        dose = None
    return ttype + sub + (index or ""), sub, dose, words


def target_dose_from_name(name: str) -> float | None:
    """Dose in Gy encoded in a target's name, or None (see module docstring for the rule).

    ``PTV_70`` -> 70.0, ``PTV_7000`` -> 70.0 (cGy), ``PTV_5425`` -> 54.25,
    ``PTV 50.4Gy`` -> 50.4, ``PTV_High`` -> None, ``Parotid_L`` -> None.
    """
    parsed = _parse_target(str(name))
    return None if parsed is None else parsed[2]


def _canonical_target(name: str) -> str | None:
    parsed = _parse_target(name)
    if parsed is None:
        return None
    head, _sub, dose, words = parsed
    parts = [head]
    if dose is not None:
        parts.append(_format_gy(dose))
    parts.extend(w if any(c.isdigit() for c in w) else w[:1].upper() + w[1:].lower()
                 for w in words)
    return "_".join(parts)


# --- public API ------------------------------------------------------------------------
def is_helper_name(name: str) -> bool:
    """True for optimisation/helper structures (rule 2 of the module docstring)."""
    text = name.strip()
    if re.match(r"^z([_\-\s]|[A-Z0-9])", text) or text.startswith("_"):
        return True
    key = name_key(text)
    return key.startswith(_CONTROL_KEY_PREFIXES) and not key.startswith("optic")


def canonical_name(name: str, table: AliasTable | None = None) -> str | None:
    """TG-263 canonical name of ``name``, or None when unknown (rules in module docs)."""
    if name is None:
        return None
    text = str(name).strip()
    if not name_key(text):
        return None
    if is_helper_name(text):
        return text
    target = _canonical_target(text)
    if target is not None:
        return target
    table = table or AliasTable.default()
    hit = table.lookup(text)
    if hit is not None:
        return hit
    m = _PRV_RE.match(text)
    if m and m.group(1):
        organ = table.lookup(m.group(1))
        if organ is not None:
            mm = m.group(2)
            return f"{organ}_PRV" + (f"{int(mm):02d}" if mm else "")
    return None


def role_for(canonical: str) -> Role:
    """Planning role of a canonical name.

    PTV*/CTV*/GTV*/ITV* -> TARGET; External/Body -> EXTERNAL; helper structures (Ring*,
    z*, opt*, avoid*, leading '_') -> CONTROL; everything else -> ORGAN.
    """
    text = str(canonical).strip()
    if is_helper_name(text):
        return Role.CONTROL
    key = name_key(text)
    if key in ("external", "body"):
        return Role.EXTERNAL
    if _TARGET_RE.match(text):
        return Role.TARGET
    return Role.ORGAN


__all__ = [
    "DEFAULT_ALIAS_FILE",
    "AliasTable",
    "canonical_name",
    "is_helper_name",
    "name_key",
    "role_for",
    "target_dose_from_name",
]
