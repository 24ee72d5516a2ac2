"""TG-263 structure-name canonicalisation, roles and target doses."""

from __future__ import annotations

import pytest

from atp.errors import InputError
from atp.names import (
    DEFAULT_ALIAS_FILE,
    AliasTable,
    canonical_name,
    role_for,
    target_dose_from_name,
)
from atp.patient import Role


@pytest.mark.parametrize("raw", ["Parotid_L", "lparotid", "L Parotid", "Left Parotid",
                                 "LeftParotid", "parotid lt", "PAROTID_LT", "Parotid-Left",
                                 "l_parotid_gland"])
def test_left_parotid_variants(raw):
    assert canonical_name(raw) == "Parotid_L"


@pytest.mark.parametrize("raw,expected", [
    ("RightParotid", "Parotid_R"), ("Rt Parotid", "Parotid_R"),
    ("SpinalCord", "SpinalCord"), ("spinal cord", "SpinalCord"), ("CORD", "SpinalCord"),
    ("Brain Stem", "Brainstem"), ("Mandible", "Bone_Mandible"), ("Esophagus", "Esophagus"),
    ("oesophagus", "Esophagus"), ("Larynx", "Larynx"), ("lung", "Lungs"),
    ("Lung L", "Lung_L"), ("rlung", "Lung_R"), ("Femoral Head Lt", "Femur_Head_L"),
    ("optic nerve rt", "OpticNrv_R"), ("Chiasm", "OpticChiasm"), ("LensL", "Lens_L"),
    ("Submandibular R", "Glnd_Submand_R"), ("oral cavity", "Cavity_Oral"),
    ("small bowel", "Bowel_Small"), ("BODY", "External"), ("External", "External"),
    ("Cord PRV 5mm", "SpinalCord_PRV05"), ("Brainstem_PRV", "Brainstem_PRV"),
    ("Brachial Plexus L", "BrachialPlex_L"), ("Lt Cochlea", "Cochlea_L"),
])
def test_organ_names(raw, expected):
    assert canonical_name(raw) == expected


@pytest.mark.parametrize("raw,expected,dose", [
    ("PTV70", "PTV_70", 70.0), ("PTV_7000", "PTV_70", 70.0), ("ptv 70", "PTV_70", 70.0),
    ("PTV 70Gy", "PTV_70", 70.0), ("PTV56", "PTV_56", 56.0), ("PTV63", "PTV_63", 63.0),
    ("PTV_5425", "PTV_54.25", 54.25), ("PTV_50.4", "PTV_50.4", 50.4),
    ("PTV 5040 cGy", "PTV_50.4", 50.4), ("CTVn 56 Gy", "CTVn_56", 56.0),
    ("PTV high", "PTV_High", None), ("GTV", "GTV", None), ("PTV1", "PTV1", None),
])
def test_targets(raw, expected, dose):
    assert canonical_name(raw) == expected
    assert target_dose_from_name(raw) == dose
    assert role_for(expected) == Role.TARGET
    # canonical names are fixed points
    assert canonical_name(expected) == expected


def test_target_dose_of_non_targets():
    assert target_dose_from_name("Parotid_L") is None
    assert target_dose_from_name("PTV_70") == 70.0


@pytest.mark.parametrize("name,role", [
    ("PTV_70", Role.TARGET), ("CTV_56", Role.TARGET), ("GTV", Role.TARGET),
    ("External", Role.EXTERNAL), ("Body", Role.EXTERNAL), ("Ring_PTV70", Role.CONTROL),
    ("zPTV_opt", Role.CONTROL), ("opt_PTV", Role.CONTROL), ("OpticChiasm", Role.ORGAN),
    ("Parotid_L", Role.ORGAN), ("SpinalCord_PRV05", Role.ORGAN),
])
def test_roles(name, role):
    assert role_for(name) == role


def test_helpers_and_unknown_names():
    assert canonical_name("Ring_PTV70") == "Ring_PTV70"
    assert canonical_name("zPTV_opt") == "zPTV_opt"
    assert canonical_name("Foo") is None
    assert canonical_name("zygoma") is None  # not the TG-263 z prefix
    assert canonical_name("  ") is None


def test_every_canonical_name_is_a_fixed_point():
    table = AliasTable.default()
    for name in table.canonical_names:
        assert canonical_name(name, table) == name


def test_user_table_extends_and_overrides(tmp_path):
    user = tmp_path / "aliases.yaml"
    user.write_text("structures:\n  Parotids: [ohrspeicheldruese]\n"
                    "lateral:\n  Parotid: [glandula parotis]\n"
                    "aliases:\n  cord: CaudaEquina\n")
    table = AliasTable.default().merged(AliasTable.load(user))
    assert canonical_name("ohrspeicheldruese", table) == "Parotids"
    assert canonical_name("glandula parotis links", table) is None  # German side word
    assert canonical_name("glandula parotis L", table) == "Parotid_L"
    assert canonical_name("cord", table) == "CaudaEquina"       # override wins
    assert canonical_name("cord") == "SpinalCord"               # default untouched
    assert canonical_name("lparotid", table) == "Parotid_L"      # defaults kept


def test_bad_alias_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("structures:\n  Heart: [a, b\n")
    with pytest.raises(InputError) as ei:
        AliasTable.load(bad)
    assert ei.value.file == str(bad) and ei.value.line is not None
    bad.write_text("structures:\n  Heart: cor\n")
    with pytest.raises(InputError, match="list") as ei:
        AliasTable.load(bad)
    assert ei.value.field == "structures.Heart"
    bad.write_text("organs: {}\n")
    with pytest.raises(InputError, match="unknown section"):
        AliasTable.load(bad)
    with pytest.raises(InputError):
        AliasTable.load(tmp_path / "missing.yaml")


def test_default_file_is_in_package():
    assert DEFAULT_ALIAS_FILE.is_file()
    assert DEFAULT_ALIAS_FILE.parent.name == "data"


def test_openkbp_roi_names_agree_with_the_openkbp_reader():
    from atp.io.openkbp import OPENKBP_CANONICAL

    for roi, (name, role, rx) in OPENKBP_CANONICAL.items():
        assert canonical_name(roi) == name
        assert role_for(name) == role
        assert target_dose_from_name(roi) == rx
