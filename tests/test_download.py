"""The HAM10000 downloader against a real HTTP server on 127.0.0.1 serving a tiny synthetic archive.

Nothing here touches the internet: each test builds six 8x8 JPEGs, two zips and a metadata CSV, serves
them with ``ThreadingHTTPServer`` (which honours Range and logs every request) and points the CLI at
them through a YAML config written in the test.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lesionnet.classes import CLASS_NAMES
from lesionnet.cli.download import fetch
from lesionnet.data import download as dl
from lesionnet.data.metadata import load_ham10000

PART_1 = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
PART_2 = ["ISIC_0000004", "ISIC_0000005", "ISIC_0000006"]
DX = ["akiec", "bcc", "bkl", "mel", "nv", "vasc"]


# --------------------------------------------------------------------------- synthetic data


def jpeg(seed: int) -> bytes:
    """An 8x8 random-pixel JPEG, different per seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    """Stored (uncompressed) so a flipped byte lands in member data and only the CRC can notice."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def images_zip(folder: str, ids: list[str]) -> bytes:
    return make_zip({f"{folder}/{i}.jpg": jpeg(int(i[-7:])) for i in ids})


def metadata_csv(ids: list[str]) -> bytes:
    rows = pd.DataFrame(
        {
            "lesion_id": [f"HAM_{n:07d}" for n in range(len(ids))],
            "image_id": ids,
            "dx": [DX[n % len(DX)] for n in range(len(ids))],
            "dx_type": "histo",
            "age": 50.0,
            "sex": "female",
            "localization": "back",
        }
    )
    return rows.to_csv(index=False).encode()


def flip_member_byte(archive: bytes) -> bytes:
    """Flip one byte inside the first member's data (not its header), so only testzip can tell."""
    info = zipfile.ZipFile(io.BytesIO(archive)).infolist()[0]
    header = info.header_offset
    name_len = int.from_bytes(archive[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(archive[header + 28 : header + 30], "little")
    pos = header + 30 + name_len + extra_len + info.compress_size // 2
    return archive[:pos] + bytes([archive[pos] ^ 0xFF]) + archive[pos + 1 :]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- server


@dataclass
class Served:
    """What the server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    user_agents: set[str] = field(default_factory=set)
    ignore_range: bool = False
    wrong_range: bool = False  # answer any Range with 206 for the whole file
    fail_next: int = 0
    drop_next_after: int | None = None  # announce the full length, send this many bytes, hang up
    url: str = ""


def handler_for(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0].lstrip("/")
            served.requests.append((path, self.headers.get("Range")))
            served.user_agents.add(self.headers.get("User-Agent", ""))
            if path.startswith("redirect/"):  # like Dataverse handing a download over to S3
                self.send_response(303)
                self.send_header("Location", f"{served.url}/{path.removeprefix('redirect/')}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if served.fail_next:
                served.fail_next -= 1
                self.send_error(503)
                return
            if path not in served.files:
                self.send_error(404)
                return
            self._send(served.files[path])

        def _send(self, data: bytes) -> None:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and not served.ignore_range:
                start = 0 if served.wrong_range else int(match[1])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                data = data[start:]
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if served.drop_next_after is not None:
                data, served.drop_next_after = data[: served.drop_next_after], None
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def served() -> Iterator[Served]:
    state = Served()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- config and helpers


def ham_files(part_1: bytes | None = None, part_2: bytes | None = None, csv: bytes | None = None) -> dict[str, bytes]:
    return {
        "HAM10000_metadata.csv": csv if csv is not None else metadata_csv(PART_1 + PART_2),
        "HAM10000_images_part_1.zip": part_1 if part_1 is not None else images_zip("HAM10000_images_part_1", PART_1),
        "HAM10000_images_part_2.zip": part_2 if part_2 is not None else images_zip("HAM10000_images_part_2", PART_2),
    }


def write_config(
    tmp_path: Path, served: Served, files: dict[str, bytes], md5s: dict[str, str | None] | None = None
) -> Path:
    """A download YAML for the served files; MD5s default to the true ones, None means unknown."""
    md5s = md5s or {}
    specs = []
    for name, data in files.items():
        is_zip = name.endswith(".zip")
        specs.append(
            {
                "name": name,
                "url": f"{served.url}/{name}?format=original",
                "md5": md5s.get(name, md5(data)),
                "size": None,
                "kind": "zip" if is_zip else "metadata",
                "target": name.removesuffix(".zip") if is_zip else name,
            }
        )
    cfg = {
        "user_agent": "lesionnet-test-agent",
        "timeout_s": 5,
        "retries": 2,
        "backoff_s": 0.01,
        "sources": {"dataverse": {"expected_images": None, "convert": None, "files": specs}},
    }
    path = tmp_path / "conf" / "download" / "served.yaml"  # an option of the download group, outside the package
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


def compose_download(config: Path, *overrides: str) -> DictConfig:
    """What ``lesionnet download --config-dir <conf> download=<name> <overrides>`` composes."""
    group_root = config.parent.parent
    with initialize_config_module(config_module="lesionnet.conf", version_base="1.3"):
        return compose(
            "download", overrides=[f"hydra.searchpath=[file://{group_root}]", f"download={config.stem}", *overrides]
        )


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    def run(dest: Path, config: Path, *overrides: str) -> tuple[int, str, str]:
        code = fetch(compose_download(config, f"dest={dest}", *overrides))
        out, err = capsys.readouterr()
        return code, out, err

    return run


# --------------------------------------------------------------------------- tests


def test_end_to_end_download_builds_layout_and_prints_data_root(tmp_path, served, cli):
    served.files = ham_files()
    dest = tmp_path / "ham"
    code, out, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert (dest / "HAM10000_metadata.csv").read_bytes() == served.files["HAM10000_metadata.csv"]
    assert sorted(p.name for p in (dest / "HAM10000_images_part_1").iterdir()) == [f"{i}.jpg" for i in PART_1]
    assert sorted(p.name for p in (dest / "HAM10000_images_part_2").iterdir()) == [f"{i}.jpg" for i in PART_2]
    assert not (dest / "HAM10000_images_part_1" / "HAM10000_images_part_1").exists()
    assert len(load_ham10000(dest)) == 6
    assert f"HAM10000 ready: 6 images. Train with: lesionnet train data.root={dest.resolve()}" in out
    assert not (dest / ".partial").exists(), "finished downloads must leave no .part files"
    assert served.user_agents == {"lesionnet-test-agent"}, "Dataverse refuses urllib's default agent"


def test_flat_zip_without_folder_lands_in_target(tmp_path, served, cli):
    """The real Dataverse zips hold the JPEGs at top level; they must end up in the same place."""
    served.files = ham_files(part_1=make_zip({f"{i}.jpg": jpeg(int(i[-7:])) for i in PART_1}))
    dest = tmp_path / "ham"
    code, _, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert (dest / "HAM10000_images_part_1" / "ISIC_0000001.jpg").is_file()


def test_resume_completes_partial_file_with_range_request(tmp_path, served, cli):
    served.files = ham_files()
    data = served.files["HAM10000_images_part_1.zip"]
    dest = tmp_path / "ham"
    (dest / ".partial").mkdir(parents=True)
    head = len(data) // 3
    (dest / ".partial" / "HAM10000_images_part_1.zip.part").write_bytes(data[:head])
    code, _, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert ("HAM10000_images_part_1.zip", f"bytes={head}-") in served.requests
    assert ("HAM10000_metadata.csv", None) in served.requests, "fresh files are requested without Range"
    assert len(load_ham10000(dest)) == 6


def test_dropped_connection_resumes_with_range_request(tmp_path, served, cli):
    served.files = ham_files()
    served.drop_next_after = 200  # the first response (the metadata CSV) stops short
    code, _, err = cli(tmp_path / "ham", write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert "connection closed after 200 of" in err
    assert served.requests[:2] == [("HAM10000_metadata.csv", None), ("HAM10000_metadata.csv", "bytes=200-")]


def test_range_header_survives_redirect(tmp_path, served, cli):
    served.files = ham_files()
    data = served.files["HAM10000_images_part_1.zip"]
    dest = tmp_path / "ham"
    (dest / ".partial").mkdir(parents=True)
    (dest / ".partial" / "HAM10000_images_part_1.zip.part").write_bytes(data[:50])
    config = write_config(tmp_path, served, served.files)
    config.write_text(config.read_text().replace("/HAM10000_images_part_1.zip", "/redirect/HAM10000_images_part_1.zip"))
    code, _, err = cli(dest, config)
    assert code == 0, err
    assert ("redirect/HAM10000_images_part_1.zip", "bytes=50-") in served.requests
    assert ("HAM10000_images_part_1.zip", "bytes=50-") in served.requests


def test_server_ignoring_range_restarts_from_zero(tmp_path, served, cli):
    served.files = ham_files()
    served.ignore_range = True
    data = served.files["HAM10000_images_part_1.zip"]
    dest = tmp_path / "ham"
    (dest / ".partial").mkdir(parents=True)
    (dest / ".partial" / "HAM10000_images_part_1.zip.part").write_bytes(data[:100])
    code, out, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert "ignored the Range request" in out
    assert len(load_ham10000(dest)) == 6


def test_server_sending_another_range_restarts_from_zero(tmp_path, served, cli):
    served.files = ham_files()
    served.wrong_range = True
    data = served.files["HAM10000_images_part_1.zip"]
    dest = tmp_path / "ham"
    (dest / ".partial").mkdir(parents=True)
    (dest / ".partial" / "HAM10000_images_part_1.zip.part").write_bytes(data[:100])
    code, _, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert "server answered Range bytes=100- with bytes 0-" in err
    assert [r for r in served.requests if r[0] == "HAM10000_images_part_1.zip"] == [
        ("HAM10000_images_part_1.zip", "bytes=100-"),
        ("HAM10000_images_part_1.zip", None),
    ]


def test_http_416_on_complete_partial_means_done(tmp_path, served, cli):
    served.files = ham_files()
    data = served.files["HAM10000_images_part_2.zip"]
    dest = tmp_path / "ham"
    (dest / ".partial").mkdir(parents=True)
    (dest / ".partial" / "HAM10000_images_part_2.zip.part").write_bytes(data)
    code, _, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert ("HAM10000_images_part_2.zip", f"bytes={len(data)}-") in served.requests


def test_transient_server_error_is_retried(tmp_path, served, cli):
    served.files = ham_files()
    served.fail_next = 2
    code, _, err = cli(tmp_path / "ham", write_config(tmp_path, served, served.files))
    assert code == 0, err
    assert "HTTP 503" in err and "retrying" in err


def test_corrupted_download_md5_mismatch_deletes_file_and_says_rerun(tmp_path, served, cli):
    good = ham_files()
    served.files = ham_files(part_1=flip_member_byte(good["HAM10000_images_part_1.zip"]))
    dest = tmp_path / "ham"
    config = write_config(tmp_path, served, good)  # MD5s of the good files
    code, _, err = cli(dest, config)
    assert code == 1
    expected, actual = md5(good["HAM10000_images_part_1.zip"]), md5(served.files["HAM10000_images_part_1.zip"])
    assert "HAM10000_images_part_1.zip" in err and expected in err and actual in err
    assert "run the command again" in err
    assert "Traceback" not in err
    assert not (dest / ".partial" / "HAM10000_images_part_1.zip.part").exists()


def test_corrupted_zip_without_md5_caught_by_crc_check(tmp_path, served, cli):
    served.files = ham_files()
    served.files["HAM10000_images_part_1.zip"] = flip_member_byte(served.files["HAM10000_images_part_1.zip"])
    config = write_config(tmp_path, served, served.files, md5s={"HAM10000_images_part_1.zip": None})
    code, _, err = cli(tmp_path / "ham", config)
    assert code == 1
    assert "HAM10000_images_part_1/ISIC_0000001.jpg fails its CRC check" in err
    assert "run the command again" in err


def test_metadata_row_without_image_is_clear_error(tmp_path, served, cli):
    served.files = ham_files(csv=metadata_csv([*PART_1, *PART_2, "ISIC_0999999"]))
    code, out, err = cli(tmp_path / "ham", write_config(tmp_path, served, served.files))
    assert code == 1
    error_lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error: ")]  # skip progress bars
    assert len(error_lines) == 1 and "ISIC_0999999" in error_lines[0] and "delete their rows" in error_lines[0]
    assert "Traceback" not in err and "ready" not in out


@pytest.mark.parametrize("evil", ["../evil.jpg", "HAM10000_images_part_2/../../evil.jpg", "/tmp/evil.jpg"])
def test_zip_slip_member_refused(tmp_path, served, cli, evil):
    served.files = ham_files(part_2=make_zip({"HAM10000_images_part_2/ISIC_0000004.jpg": jpeg(4), evil: b"x"}))
    dest = tmp_path / "deep" / "ham"
    code, _, err = cli(dest, write_config(tmp_path, served, served.files))
    assert code == 1
    assert "Refusing to unpack HAM10000_images_part_2.zip" in err and repr(evil) in err
    assert not (dest / "HAM10000_images_part_2").exists(), "an unsafe zip must write nothing"
    assert not list(tmp_path.rglob("evil.jpg"))


def test_second_run_downloads_nothing(tmp_path, served, cli):
    served.files = ham_files()
    dest = tmp_path / "ham"
    config = write_config(tmp_path, served, served.files)
    assert cli(dest, config)[0] == 0
    served.requests.clear()
    code, out, err = cli(dest, config)
    assert code == 0, err
    assert served.requests == []
    assert out.count("already installed") == 3 and "HAM10000 ready: 6 images" in out


def test_keep_archives_then_force_refetches_everything(tmp_path, served, cli):
    served.files = ham_files()
    dest = tmp_path / "ham"
    config = write_config(tmp_path, served, served.files)
    assert cli(dest, config, "keep_archives=true")[0] == 0
    assert sorted(p.name for p in (dest / ".downloads").iterdir()) == sorted(served.files)
    (dest / "HAM10000_images_part_1" / "ISIC_0000002.jpg").unlink()
    served.requests.clear()
    code, out, err = cli(dest, config, "keep_archives=true")
    assert code == 0, err
    assert served.requests == [], "a kept, verified archive is unpacked again without downloading"
    assert "verifying the kept archive" in out
    code, _, err = cli(dest, config, "force=true")
    assert code == 0, err
    assert sorted(path for path, _ in served.requests) == sorted(served.files)
    assert not (dest / ".downloads").exists(), "without --keep-archives nothing is kept"


def test_second_run_refetches_only_what_went_missing(tmp_path, served, cli):
    served.files = ham_files()
    dest = tmp_path / "ham"
    config = write_config(tmp_path, served, served.files)
    assert cli(dest, config)[0] == 0
    (dest / "HAM10000_images_part_2" / "ISIC_0000005.jpg").unlink()
    served.requests.clear()
    code, _, err = cli(dest, config)
    assert code == 0, err
    assert [path for path, _ in served.requests] == ["HAM10000_images_part_2.zip"]


def test_isic_source_builds_metadata_from_ground_truth_and_groupings(tmp_path, served, cli):
    ids = PART_1 + PART_2
    columns = [c.upper() for c in CLASS_NAMES]
    onehot = pd.DataFrame(0.0, index=range(len(ids)), columns=columns)
    for row, n in enumerate(range(len(ids))):
        onehot.loc[row, DX[n % len(DX)].upper()] = 1.0
    onehot.loc[1] = onehot.loc[0]  # the first two images show one lesion, so they share its dx
    groups = pd.DataFrame({"image": ids, "lesion_id": ["HAM_1", "HAM_1", "HAM_2", "HAM_3", "HAM_4", "HAM_5"]})
    groups["diagnosis_confirm_type"] = "histopathology"
    gt = pd.concat([pd.DataFrame({"image": ids}), onehot], axis=1).to_csv(index=False).encode()
    served.files = {
        "ISIC2018_Task3_Training_Input.zip": images_zip("ISIC2018_Task3_Training_Input", ids),
        "ISIC2018_Task3_Training_GroundTruth.zip": make_zip(
            {"ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv": gt}
        ),
        "ISIC2018_Task3_Training_LesionGroupings.csv": groups.to_csv(index=False).encode(),
    }
    files = [
        {"name": "ISIC2018_Task3_Training_Input.zip", "kind": "zip", "target": "images",
         "strip_prefix": "ISIC2018_Task3_Training_Input"},
        {"name": "ISIC2018_Task3_Training_GroundTruth.zip", "kind": "zip", "target": ".isic2018",
         "strip_prefix": "ISIC2018_Task3_Training_GroundTruth"},
        {"name": "ISIC2018_Task3_Training_LesionGroupings.csv", "kind": "metadata",
         "target": ".isic2018/ISIC2018_Task3_Training_LesionGroupings.csv"},
    ]  # fmt: skip
    for f in files:
        f.update(url=f"{served.url}/{f['name']}", md5=md5(served.files[f["name"]]))
    convert = {
        "kind": "isic2018_task3",
        "ground_truth": ".isic2018/ISIC2018_Task3_Training_GroundTruth.csv",
        "lesion_groupings": ".isic2018/ISIC2018_Task3_Training_LesionGroupings.csv",
    }
    config = tmp_path / "conf" / "download" / "isic.yaml"
    config.parent.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"sources": {"isic": {"files": files, "convert": convert}}}), config)
    dest = tmp_path / "isic"
    code, out, err = cli(dest, config, "source=isic")
    assert code == 0, err
    table = load_ham10000(dest)
    assert list(table["image_id"]) == ids
    assert list(table["lesion_id"][:2]) == ["HAM_1", "HAM_1"]
    assert list(table["dx"]) == ["akiec", "akiec", "bkl", "mel", "nv", "vasc"]
    assert "HAM10000 ready: 6 images" in out


def test_unknown_source_and_missing_config_are_clear_errors(tmp_path, served, cli):
    served.files = ham_files()
    config = write_config(tmp_path, served, served.files)
    code, _, err = cli(tmp_path / "ham", config, "source=kaggle")
    assert code == 1 and "Unknown source 'kaggle'" in err and "dataverse" in err
    with pytest.raises(MissingConfigException, match="Could not find 'download/nope'"):
        cli(tmp_path / "ham", tmp_path / "conf" / "download" / "nope.yaml")
    with pytest.raises(dl.DownloadError, match="Download config not found"):
        dl.load_config(tmp_path / "nope.yaml", "dataverse")


def test_missing_dest_says_how_to_give_it(capsys):
    code = fetch(compose_download(dl.DEFAULT_CONFIG))
    assert code == 1 and "lesionnet download dest=DIR" in capsys.readouterr().err


def test_shipped_config_is_valid_for_both_sources():
    for source in ("dataverse", "isic"):
        _, spec = dl.load_config(dl.DEFAULT_CONFIG, source)
        assert spec.expected_images == 10015
        assert {f.kind for f in spec.files} == {"zip", "metadata"}
        assert all(f.url.startswith("https://") for f in spec.files)


def test_composed_default_group_is_the_shipped_file():
    with initialize_config_module(config_module="lesionnet.conf", version_base="1.3"):
        cfg = compose("download", overrides=["dest=x"])
    assert OmegaConf.to_container(cfg.download) == OmegaConf.to_container(OmegaConf.load(dl.DEFAULT_CONFIG))
    assert dl.load_config(OmegaConf.to_container(cfg.download), "isic") == dl.load_config(dl.DEFAULT_CONFIG, "isic")


def test_lesionnet_download_command_with_a_config_dir_outside_the_package(tmp_path, served):
    """The real Hydra app, from another folder: the mirror's YAML is an option of the download group."""
    served.files = ham_files()
    config, dest = write_config(tmp_path, served, served.files), tmp_path / "ham"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "lesionnet"),
            "download",
            "--config-dir",
            str(config.parent.parent),
            "download=served",
            f"dest={dest}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HAM10000 ready: 6 images" in result.stdout and len(load_ham10000(dest)) == 6
    again = subprocess.run(
        [
            str(Path(sys.executable).parent / "lesionnet"),
            "download",
            f"dest={dest}",
            "source=nowhere",
            f"hydra.run.dir={tmp_path / 'run2'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 1 and "error: Unknown source 'nowhere'" in again.stderr
    assert "Traceback" not in again.stderr
