"""The hook->daemon DomainRecord: typed, versioned, read strictly; records of earlier releases still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hostguard.domain.record import SCHEMA, DomainRecord, RecordedDisk, RecordedLayer, parse_domain_record
from hostguard.errors import FormatError
from hostguard.host.statedir import load_domain_record, load_domain_records, save_domain_record

DATA = Path(__file__).parent / "data"
UUID = "6f1c2b7e-9a43-4d2e-8c1f-2b9d3e4a5f60"


def test_a_record_written_by_release_0_1_0_reads_as_schema_1() -> None:
    record = parse_domain_record((DATA / "domain-record-0.1.0.json").read_bytes())
    assert record.uuid == UUID and record.name == "web1"
    assert record.primary_envelope() == "/var/lib/libvirt/images/web.qcow2.hgsig"
    assert [(x.role, x.ino) for x in record.disks[0].layers] == [("overlay", 131075), ("signed", 131074)]
    assert record.disks[0].signed_layer().path == "/var/lib/libvirt/images/web.qcow2"
    assert record.boot[0].dev == 2049 and record.images[0].signers == ("CN=build,O=Example",)


def test_the_json_form_round_trips_and_names_its_schema() -> None:
    record = parse_domain_record((DATA / "domain-record-0.1.0.json").read_bytes())
    data = record.to_json()
    assert json.loads(data)["schema"] == SCHEMA
    assert parse_domain_record(data) == record


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": 3}, "schema 3 is not 1 or 2"),
        ({"host_made": []}, "'host_made' needs schema 2"),
        ({"uuid": 7}, "'uuid' must be a string"),
        ({"disks": [{"target": "vda", "envelope": "e", "layers": []}]}, "overlays over one signed base"),
        (
            {
                "disks": [
                    {
                        "target": "vda",
                        "envelope": "e",
                        "layers": [{"path": "p", "format": "raw", "dev": 1, "ino": 2, "role": "base"}],
                    }
                ]
            },
            "layer role 'base'",
        ),
        ({"boot": [{"path": "k", "dev": -1, "ino": 2}]}, "'dev' must be a non-negative integer"),
        ({"images": "x"}, "'images' must be a list of objects"),
    ],
)
def test_malformed_or_newer_records_are_refused_with_one_line(change: dict[str, object], message: str) -> None:
    doc = json.loads((DATA / "domain-record-0.1.0.json").read_bytes())
    doc.update(change)
    with pytest.raises(FormatError, match=message) as info:
        parse_domain_record(json.dumps(doc).encode())
    assert "\n" not in str(info.value)


def test_not_json_is_refused() -> None:
    with pytest.raises(FormatError, match="not JSON"):
        parse_domain_record(b"\xff{")


def test_the_state_directory_keeps_records_by_uuid(tmp_path: Path) -> None:
    layer = RecordedLayer("/img/base.qcow2", "qcow2", 1, 2, "signed")
    record = DomainRecord(name="a", uuid=UUID, disks=(RecordedDisk("vda", "/img/base.qcow2.hgsig", (layer,)),))
    save_domain_record(tmp_path, record)
    assert load_domain_record(tmp_path, UUID) == record
    assert load_domain_records(tmp_path) == {UUID: record}
    assert load_domain_record(tmp_path, "0" * 8 + UUID[8:]) is None
    assert (tmp_path / "domains" / f"{UUID}.json").stat().st_mode & 0o777 == 0o600


def test_a_record_filed_under_another_uuid_is_refused(tmp_path: Path) -> None:
    other = "0" * 8 + UUID[8:]
    (tmp_path / "domains").mkdir()
    (tmp_path / "domains" / f"{other}.json").write_bytes((DATA / "domain-record-0.1.0.json").read_bytes())
    with pytest.raises(FormatError, match="record of another domain"):
        load_domain_record(tmp_path, other)


def test_a_uuid_never_reaches_the_file_system_unchecked(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not a domain uuid"):
        load_domain_record(tmp_path, "../../etc/passwd")


def test_a_schema_2_record_names_its_host_made_files_and_round_trips() -> None:
    record = parse_domain_record((DATA / "domain-record-schema-2.json").read_bytes())
    assert record.host_made is not None and record.host_made[0].kind == "Nova config drive"
    assert (record.host_made[0].dev, record.host_made[0].ino) == (2049, 393217)
    assert parse_domain_record(record.to_json()) == record


def test_a_schema_1_record_does_not_know_its_host_made_files() -> None:
    record = parse_domain_record((DATA / "domain-record-0.1.0.json").read_bytes())
    assert record.host_made is None  # not known, which is not "none": the block-graph stage says so
    assert "host_made" not in json.loads(record.to_json())
