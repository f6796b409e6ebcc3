"""Downloads by name: the authors' DiT checkpoints, SiT's, ADM's reference batches, the FID
Inception weights, the official DINOv2 backbones and Fashion-MNIST's four files
(`fashion-mnist/<file>.gz`), fetched once into a cache folder and verified.

- Cache: `$DITLAB_HOME` (default `~/.cache/ditlab`), one file per released name. A file there is
  used without a request; it is verified again whenever its size or modification time differs from
  when it was last verified (`.NAME.verified`), e.g. a file put there by hand or changed since.
- `DITLAB_MIRROR=URL` (http, https or file) replaces every download location: a file is looked up
  there by its name (URL/DiT-XL-2-256x256.pt), for clusters without internet.
- `DITLAB_OFFLINE=1` never touches the network; without network a download fails after a
  connection attempt of at most `CONNECT_TIMEOUT_S`. Both say in one line which URL to fetch
  and the exact path to put the file at.
- A download goes to `.NAME.part` beside the target under a lock (fcntl), so two processes
  download once (the second waits and finds the file); an interrupted download is resumed with an
  HTTP Range request, by the same call (a few times, while it makes progress) or by the next run.
  An attempt that delivers less than `STALL_BYTES` in `STALL_S` seconds counts as interrupted (the
  bytes received are kept). It is verified before it is renamed into place: the byte count the
  server announced, the size and SHA-256 pinned where known (and the SHA-256 prefix a name carries:
  torch-fidelity's Inception weights), and the structural check its registry entry names, which
  lives with the code that reads such files: it loads as what it claims to be, and as what its name
  implies (DiT-XL/2 at 256 or 512 pixels for 1000 classes; a 256 or 512 pixel reference batch; a
  DINOv2 of the named architecture). A file that fails is removed, in one line.
- Under torchrun rank 0 downloads while the other ranks wait at a barrier."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.client
import importlib
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from ditlab.data.named import FASHION_FILES, FASHION_URL, hub_name
from ditlab.errors import UserError, one_line
from ditlab.runtime.home import home as home  # the cache folder, shared with what runtime/ keeps there

CONNECT_TIMEOUT_S = 1.5  # the reachability probe: a missing network fails within this
READ_TIMEOUT_S = 60.0  # a stalled transfer
RESUME_ATTEMPTS = 3  # one call resumes an interrupted transfer at most this often, and only while it progresses
CHUNK = 1 << 20
STALL_S = 30.0  # an attempt must deliver STALL_BYTES within every window of this many seconds ...
STALL_BYTES = 64 << 10  # ... or it counts as interrupted (a server trickling a byte now and then)
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")  # of a 206 answer: START-END/TOTAL
DIT_URL = "https://dl.fbaipublicfiles.com/DiT/models/"  # the authors' download.py
SIT_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
           "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0")  # SiT's download.py (willisma/SiT)
ADM_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/"
INCEPTION_NAME = "weights-inception-2015-12-05-6726825d.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/"  # the official hubconf's _DINOV2_BASE_URL
DINOV2_ARCHS = ("vits14", "vitb14", "vitl14", "vitg14")
DINOV2_NAME = "dinov2_vitl14_pretrain.pth"  # FD-DINOv2's network (EDM2, dgm-eval)


@dataclass(frozen=True)
class Released:
    """A file ditlab can fetch by name."""

    url: str
    """its own download location (a mirror replaces everything up to the name)"""
    kind: str
    """"checkpoint", "reference", "inception", "dinov2" or "idx": what it is"""
    sha256_prefix: str | None = None
    """the leading hex digits of its SHA-256 (all of them where the publisher's file is known)"""
    model: str | None = None
    """the named config it holds (a checkpoint's state dict does not store its heads; a DINOv2
    file's official model name, which its shapes must match)"""
    objective: str = "ddpm"
    """a checkpoint's process: "ddpm" (DiT) or "flow" (SiT: `FlowMatching()`'s defaults, linear path, velocity)"""
    implies: dict[str, Any] | None = None
    """what its name implies, checked on arrival: a checkpoint's DiT constructor arguments, a reference
    batch's {"image_size"}"""
    size: int | None = None
    """its exact size in bytes, where known"""
    sha256: str | None = None
    """its whole SHA-256, where known"""
    check: str | None = None
    """"module:function" of its structural check, called with the downloaded file's path, and with
    `model=` and `implies=` where the entry sets them, before it is kept (a UserError refuses it;
    None: KIND_CHECKS of its kind). The module of the code that reads such files knows what they
    should hold; the downloader does not (it imports none of them)."""


CHECK_CHECKPOINT = "ditlab.checkpoints.formats:check_released_checkpoint"
CHECK_REFERENCE = "ditlab.evaluation.batches:check_reference_batch"
CHECK_INCEPTION = "ditlab.evaluation.inception:check_weights_file"
CHECK_DINOV2 = "ditlab.evaluation.dinov2:check_released"
CHECK_IDX = "ditlab.data.idx:check_idx_file"
KIND_CHECKS = {"checkpoint": CHECK_CHECKPOINT, "reference": CHECK_REFERENCE, "inception": CHECK_INCEPTION,
               "dinov2": CHECK_DINOV2, "idx": CHECK_IDX}
# DiT-XL/2 on SD-VAE latents for ImageNet's 1000 classes, as the authors released it (SiT's too)
_DIT_XL_2 = {"depth": 28, "hidden_size": 1152, "patch_size": 2, "in_channels": 4, "num_classes": 1000,
             "learn_sigma": True}
RELEASED: dict[str, Released] = {
    "DiT-XL-2-256x256.pt": Released(DIT_URL + "DiT-XL-2-256x256.pt", "checkpoint", model="DiT-XL/2",
                                    implies={**_DIT_XL_2, "input_size": 32}, check=CHECK_CHECKPOINT),
    "DiT-XL-2-512x512.pt": Released(DIT_URL + "DiT-XL-2-512x512.pt", "checkpoint", model="DiT-XL/2",
                                    implies={**_DIT_XL_2, "input_size": 64}, check=CHECK_CHECKPOINT),
    # SiT's models.py is DiT's with learn_sigma=True and the second half of the output dropped: the same keys
    "SiT-XL-2-256x256.pt": Released(SIT_URL, "checkpoint", model="DiT-XL/2", objective="flow",
                                    implies={**_DIT_XL_2, "input_size": 32}, check=CHECK_CHECKPOINT),
    "VIRTUAL_imagenet256_labeled.npz": Released(ADM_URL + "256/VIRTUAL_imagenet256_labeled.npz", "reference",
                                                implies={"image_size": 256}, check=CHECK_REFERENCE),
    "VIRTUAL_imagenet512.npz": Released(ADM_URL + "512/VIRTUAL_imagenet512.npz", "reference",
                                        implies={"image_size": 512}, check=CHECK_REFERENCE),
    INCEPTION_NAME: Released("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_NAME,
                             "inception", sha256_prefix="6726825d", check=CHECK_INCEPTION),
    **{hub_name(stem): Released(FASHION_URL + f"{stem}.gz", "idx", sha256_prefix=f.gz_sha256, check=CHECK_IDX)
       for stem, f in FASHION_FILES.items()},  # fashion-mnist/<stem>.gz: a name may hold a folder
}
RELEASED.update({  # the official hubconf's files: dinov2_{arch}/dinov2_{arch}[_reg4]_pretrain.pth
    f"{model}_pretrain.pth": Released(f"{DINOV2_URL}dinov2_{arch}/{model}_pretrain.pth", "dinov2", model=model,
                                      check=CHECK_DINOV2)
    for arch in DINOV2_ARCHS for model in (f"dinov2_{arch}", f"dinov2_{arch}_reg4")
})
REFERENCE_BATCHES = {"imagenet256": "VIRTUAL_imagenet256_labeled.npz", "imagenet512": "VIRTUAL_imagenet512.npz"}
"""`ditlab eval`'s names for ADM's reference batches"""


def offline() -> bool:
    return os.environ.get("DITLAB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def source_url(name: str) -> str:
    """Where `name` is fetched from: $DITLAB_MIRROR/name, else its own location."""
    mirror = os.environ.get("DITLAB_MIRROR", "").strip()
    if not mirror:
        return RELEASED[name].url
    try:
        parsed = urlparse(mirror)
        parsed.port  # noqa: B018  (raises ValueError for a port that is no number or out of range)
    except ValueError as e:
        raise UserError(f"DITLAB_MIRROR={mirror}: not a URL ({one_line(e)})") from e
    if parsed.scheme not in ("http", "https", "file") or (parsed.scheme != "file" and not parsed.hostname):
        raise UserError(f"DITLAB_MIRROR={mirror}: give an http://, https:// or file:// URL")
    return mirror.rstrip("/") + "/" + name


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None if a TCP connection to the host of `url` opens within `timeout`, else why not."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return None
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        return one_line(e)
    return None


def fetch(name: str, progress: bool = True) -> Path:
    """The cached file of the released `name`, downloaded and verified first if absent.
    Under torchrun rank 0 fetches first, the others wait at a barrier and then find it (or, with
    a cache folder of their own node, fetch it there under the lock)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from ditlab.runtime.distributed import barrier

        if dist.get_rank() == 0:
            path = _fetch(name, progress)
            barrier()
            return path
        barrier()
    return _fetch(name, progress)


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} {st.st_mtime_ns}\n"


def _verified(name: str, dst: Path) -> bool:
    """Whether `dst` is as it was when it was last verified (size and modification time)."""
    try:
        return dst.with_name(f".{dst.name}.verified").read_text() == _stamp(dst)
    except OSError:
        return False


def _in_the_way(dst: Path) -> None:
    if (dst.exists() or dst.is_symlink()) and not dst.is_file():
        raise UserError(f"{dst} is in the way of the download: it is not a file (a folder or a broken link); "
                        "remove it and run again")


def _cached(name: str, dst: Path) -> Path | None:
    """`dst` if it holds a valid `name` (verified now unless it is unchanged since it last was), None if
    absent; a cached file that fails is removed, in one line."""
    _in_the_way(dst)
    if not dst.is_file():
        return None
    if not _verified(name, dst):
        _verify(name, dst, f"{dst} (in the cache)", again=True)
        atomic_write_text_quiet(dst.with_name(f".{dst.name}.verified"), _stamp(dst))
    return dst


def atomic_write_text_quiet(path: Path, text: str) -> None:
    """Record a verification stamp; a cache folder that cannot take it only costs a check next time."""
    from ditlab.runtime.files import atomic_write_text

    try:
        atomic_write_text(path, text)
    except OSError:
        pass


def _fetch(name: str, progress: bool) -> Path:
    dst = home() / name
    if _cached(name, dst):
        return dst
    url = source_url(name)
    where = f"put {url} at {dst}"
    if offline():
        raise UserError(f"{name} is not in the cache and DITLAB_OFFLINE is set: {where}")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        lock = open(dst.with_name(f".{dst.name}.lock"), "w")
    except OSError as e:
        raise UserError(f"DITLAB_HOME {dst.parent}: cannot write there ({one_line(e)})") from e
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is downloading it: wait, then find it
            print(f"waiting for another process downloading {name} into {dst.parent}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if _cached(name, dst):
            return dst
        why = reachable(url)
        if why is not None:
            raise UserError(f"cannot reach {url} ({why}): {where}, or set DITLAB_MIRROR")
        part = dst.with_name(f".{dst.name}.part")
        _download(url, part, name, progress, where)
        _verify(name, part, url)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        _in_the_way(dst)
        os.replace(part, dst)
        atomic_write_text_quiet(dst.with_name(f".{dst.name}.verified"), _stamp(dst))
    return dst


def _open(url: str, offset: int) -> tuple[BinaryIO, int, int]:
    """(stream, the offset it starts at, total bytes) for `url` from byte `offset` on (Range)."""
    if urlparse(url).scheme == "file":
        path = Path(url2pathname(urlparse(url).path))
        f = open(path, "rb")  # FileNotFoundError: the caller says what to do
        f.seek(offset)
        return f, offset, path.stat().st_size
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = urllib.request.urlopen(request, timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the part is complete, or longer than the file: start again
            return _open(url, 0)
        raise
    if resp.status == 206:  # "Content-Range: bytes START-END/TOTAL"
        m = CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
        if m is None or int(m.group(1)) > offset or int(m.group(2)) >= int(m.group(3)):
            resp.close()  # a range answer that cannot be placed: fetch the whole file instead
            return _open_whole(url)
        return resp, int(m.group(1)), int(m.group(3))
    length = resp.headers.get("Content-Length")
    return resp, 0, int(length) if length is not None else -1


def _open_whole(url: str) -> tuple[BinaryIO, int, int]:
    resp = urllib.request.urlopen(urllib.request.Request(url), timeout=READ_TIMEOUT_S)
    if resp.status != 200:
        resp.close()
        raise urllib.error.URLError(f"answered {resp.status} to a request for the whole file")
    length = resp.headers.get("Content-Length")
    return resp, 0, int(length) if length is not None and length.isdigit() else -1


def _copy(stream: BinaryIO, out: BinaryIO, bar: Any) -> None:
    """Copy `stream` to `out` as its bytes arrive (read1: what a stalled read got is kept), until the
    end, a dropped connection, or a window of STALL_S seconds with fewer than STALL_BYTES."""
    window_start, window_bytes = time.monotonic(), 0
    read = getattr(stream, "read1", stream.read)
    try:
        while chunk := read(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))
            window_bytes += len(chunk)
            if time.monotonic() - window_start > STALL_S:
                if window_bytes < STALL_BYTES:
                    return  # trickling: give up this attempt, keep what arrived
                window_start, window_bytes = time.monotonic(), 0
    except (OSError, http.client.HTTPException):  # the connection dropped or timed out
        pass


def _download(url: str, part: Path, name: str, progress: bool, where: str) -> None:
    """Bring `part` to the whole file, resuming from its current length."""
    from tqdm.auto import tqdm

    for _ in range(RESUME_ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        try:
            stream, start, total = _open(url, have)
        except FileNotFoundError as e:
            raise UserError(f"the mirror has no {name} ({url}): {where}") from e
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"cannot download {url} ({one_line(e)}): {where}") from e
        with stream, open(part, "r+b" if start else "wb") as out, \
                tqdm(total=total if total >= 0 else None, initial=start, unit="B", unit_scale=True, desc=name,
                     disable=not progress) as bar:
            out.seek(start)
            out.truncate()
            _copy(stream, out, bar)  # resumed below if this attempt got anywhere
            got = out.tell()
        if total >= 0 and got == total or total < 0 and got > start:
            return
        if got <= have:
            break
    raise UserError(f"download of {url} interrupted at {got} of {total} bytes; run again to resume, or {where}")


def _verify(name: str, path: Path, url: str, again: bool = False) -> None:
    """The pins of `name` (size, SHA-256 or its prefix, where known), its structural check and what its
    name implies; removes a file that fails. `again`: a cached file, checked again."""
    entry = RELEASED[name]
    try:
        if entry.size is not None and path.stat().st_size != entry.size:
            raise UserError(f"{path.stat().st_size} bytes, the released file has {entry.size}")
        if entry.sha256_prefix or entry.sha256:
            digest = file_sha256(path)
            if entry.sha256 and digest != entry.sha256:
                raise UserError(f"SHA-256 {digest[:16]}... is not the released file's {entry.sha256[:16]}...")
            if entry.sha256_prefix and not digest.startswith(entry.sha256_prefix):
                raise UserError(f"SHA-256 {digest[:16]}... does not start with {entry.sha256_prefix}")
        check_of(entry)(path)
    except UserError as e:
        path.unlink(missing_ok=True)
        path.parent.joinpath(f".{Path(name).name}.verified").unlink(missing_ok=True)
        then = "; run again to download it" if again else ""
        raise UserError(f"{url}: not a valid {name} ({one_line(e)}); removed it{then}") from e


def check_of(entry: Released) -> Callable[..., None]:
    """The structural check an entry names ("module:function"), imported on use."""
    check = _named(entry.check or KIND_CHECKS[entry.kind])
    given = {k: v for k, v in (("model", entry.model), ("implies", entry.implies)) if v is not None}
    return functools.partial(check, **given) if given else check


def _named(target: str) -> Callable[..., None]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


OLD_CHECK_NAMES = {"check_checkpoint": CHECK_CHECKPOINT, "check_reference": CHECK_REFERENCE,
                   "check_inception": CHECK_INCEPTION}
"""The names the checks had here, before they moved to the modules of the files they check."""


def __getattr__(name: str) -> Callable[[Path], None]:
    if name in OLD_CHECK_NAMES:
        return _named(OLD_CHECK_NAMES[name])
    raise AttributeError(f"module 'ditlab.hub' has no attribute {name!r}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        shutil.copyfileobj(f, _HashWriter(h), CHUNK)
    return h.hexdigest()


class _HashWriter:
    def __init__(self, h: hashlib._Hash):
        self.h = h

    def write(self, data: bytes) -> None:
        self.h.update(data)
