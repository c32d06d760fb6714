"""Fetch the full HAM10000 dataset, check it, and unpack it into the layout ``load_ham10000`` reads.

    lesionnet download dest=DIR [source=dataverse|isic] [keep_archives=true] [force=true] [download=<config>]

Downloads go to ``DIR/.partial/NAME.part`` and resume with HTTP Range requests (``fetch``), because the image
archives are gigabytes on slow hosts and a restart from zero after every dropped connection would rarely
finish. Every file is checked (size and MD5 where the config knows them, the CRC of every zip member always)
before anything is unpacked (``archive``), and the unpacked folder is then read back with ``load_ham10000``
so a run that reports success has a dataset training can use (``pipeline``). ISIC's labels are converted to
HAM10000_metadata.csv (``convert``). URLs and checksums live in ``lesionnet/conf/download/ham10000.yaml``
(``config``); the command line is lesionnet/cli/download.py.
"""

from lesionnet.data.download.archive import install, md5_of, unpack, verify
from lesionnet.data.download.config import DEFAULT_CONFIG, DownloadError, FileSpec, Settings, Source, load_config
from lesionnet.data.download.convert import CONVERTERS, build_isic_metadata
from lesionnet.data.download.fetch import TransientError, download
from lesionnet.data.download.pipeline import (
    DOWNLOADS_DIR,
    PARTIAL_DIR,
    STATE_FILE,
    check_dataset,
    clear_previous,
    fetch_file,
    is_installed,
    read_state,
    run,
    write_state,
)

__all__ = [
    "CONVERTERS",
    "DEFAULT_CONFIG",
    "DOWNLOADS_DIR",
    "PARTIAL_DIR",
    "STATE_FILE",
    "DownloadError",
    "FileSpec",
    "Settings",
    "Source",
    "TransientError",
    "build_isic_metadata",
    "check_dataset",
    "clear_previous",
    "download",
    "fetch_file",
    "install",
    "is_installed",
    "load_config",
    "md5_of",
    "read_state",
    "run",
    "unpack",
    "verify",
    "write_state",
]
