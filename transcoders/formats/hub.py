"""Published transcoders on the Hugging Face hub, resolved through ``huggingface_hub``'s cache.

References (what ``--transcoders`` and ``load_transcoder`` take besides a local path):

- a repository id ``org/name``, optionally with a sub-folder and a revision:
  ``mntss/clt-gemma-2-2b-426k``, ``mntss/clt@sp10-32k``,
  ``mwhanna/gemma-scope-2-1b-pt/transcoder_all/width_16k_l0_small_affine@main``
  (circuit-tracer's convention: the first two parts name the repository, the rest a folder);
- an ``hf://org/name/path/in/repo[?revision=R]`` URI, as circuit-tracer's ``config.yaml`` lists
  per-layer files (``transcoders:``).

Files are found through ``huggingface_hub``'s own API (``snapshot_download``,
``hf_hub_download``, ``try_to_load_from_cache``), in its cache (``HF_HUB_CACHE``, or
``HF_HOME``/hub, read when called): ``models--org--name/snapshots/<commit>/...``, with branch
names resolved by ``refs/<branch>``. With ``HF_HUB_OFFLINE=1`` nothing is downloaded: a
repository, revision or file not in the cache is one :class:`HubFileMissing` line naming the
repository, the missing files and the ``hf download`` command that fetches them. Online, the
files are downloaded by ``huggingface_hub`` (with its progress bars); nothing else here talks to
the network.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

HF_SCHEME = "hf://"
_PART = r"[A-Za-z0-9][\w.-]*"
_REF = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?P<sub>(?:/[\w.+-]+)*)/?(?:@(?P<rev>[\w./+-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubFileMissing(FileNotFoundError):
    """A published transcoder's repository, revision or files are not available (one line)."""


@dataclass(frozen=True)
class HubRef:
    """A repository on the hub: ``repo_id`` (``org/name``), an optional ``subfolder`` inside it
    and an optional ``revision`` (branch, tag or commit; None = the default branch, main)."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubRef:
        """``org/name[/sub/folder][@revision]`` -> HubRef; a clear error otherwise."""
        m = _REF.match(str(text).strip())
        if not m:
            raise ValueError(
                f"{text!r} is not a hub repository id: write org/name, optionally "
                "org/name/sub/folder and @revision"
            )
        sub = m.group("sub").strip("/") or None
        return cls(m.group("repo"), sub, m.group("rev"))

    @property
    def label(self) -> str:
        """``org/name[/sub]`` plus ``@revision`` when one was asked for."""
        path = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return path + (f"@{self.revision}" if self.revision else "")

    def in_repo(self, filename: str) -> str:
        """A file's path inside the repository (under the sub-folder)."""
        return f"{self.subfolder}/{filename}" if self.subfolder else filename


@dataclass(frozen=True)
class HubFile:
    """One file of a repository: ``hf://repo_id/path[?revision=R]``."""

    repo_id: str
    path: str
    revision: str | None = None

    @classmethod
    def parse(cls, uri: str) -> HubFile:
        parsed = urlparse(uri)
        parts = parsed.path.lstrip("/").split("/", 1)
        if parsed.scheme != "hf" or not parsed.netloc or len(parts) != 2 or not parts[1]:
            raise ValueError(
                f"{uri!r} is not an hf:// file URI: write hf://org/name/path/in/repo "
                "(optionally ?revision=R)"
            )
        revision = parse_qs(parsed.query).get("revision", [None])[0] or None
        return cls(f"{parsed.netloc}/{parts[0]}", parts[1], revision)


def looks_like_reference(text: str) -> bool:
    """Whether ``text`` (not an existing path) reads as a hub repository id or hf:// URI."""
    s = str(text)
    if s.startswith(HF_SCHEME):
        return True
    if s.startswith((".", "/", "~", "\\")) or Path(s).exists():
        return False
    return _REF.match(s) is not None


def cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` uses, from the environment as it is now:
    ``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (default ``~/.cache/huggingface/hub``)."""
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = env.get("HF_HOME")
    if not home:
        xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
        home = os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set true, now or when huggingface_hub
    was imported."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in ("1", "ON", "YES", "TRUE") or constants.is_offline_mode()


def download_command(repo_id: str, files: list[str] | None, revision: str | None) -> str:
    """The ``hf download`` command (huggingface_hub's CLI; ``huggingface-cli download`` in
    older releases) that puts ``files`` (all when None) of a repository into the cache."""
    names = [f for f in files or [] if "*" not in f]
    globs = [f for f in files or [] if "*" in f]
    parts = ["hf", "download", repo_id, *names]
    for g in globs:  # patterns are --include options (quoted for the shell)
        parts += ["--include", f"'{g}'"]
    if revision:
        parts += ["--revision", revision]
    return " ".join(parts)


def _cached_revisions(repo_id: str) -> list[str]:
    """Branch names and commits of ``repo_id`` held in the cache (for error messages)."""
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache_dir())
    except Exception:  # noqa: BLE001 - no cache folder at all: nothing cached
        return []
    out = []
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for rev in repo.revisions:
                refs = ",".join(sorted(rev.refs))
                out.append(f"{refs} ({rev.commit_hash[:12]})" if refs else rev.commit_hash[:12])
    return sorted(out)


def _not_cached(repo_id: str, revision: str | None, files: list[str] | None) -> HubFileMissing:
    rev = revision or "main"
    where = f"{repo_id}@{rev}"
    cached = _cached_revisions(repo_id)
    if files:
        shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        what = f"{len(files)} file(s) of {where} are not in the Hugging Face cache: {shown}"
    elif cached:
        what = (
            f"revision {rev!r} of {repo_id} is not in the Hugging Face cache (cached: "
            f"{'; '.join(cached)})"
        )
    else:
        what = f"{where} is not in the Hugging Face cache"
    why = "HF_HUB_OFFLINE=1" if offline() else "and the hub could not be reached"
    fix = ", or unset HF_HUB_OFFLINE" if offline() else ""
    return HubFileMissing(
        f"{what} ({cache_dir()}, {why}): fetch it on a machine with the hub with "
        f"`{download_command(repo_id, files, revision)}` (then copy the cache here){fix}"
    )


def _hub_error(err: Exception, repo_id: str, revision: str | None, files: list[str] | None):
    """One line for an error huggingface_hub raised while online."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = revision or "main"
    if isinstance(err, LocalEntryNotFoundError):
        return _not_cached(repo_id, revision, files)
    if isinstance(err, GatedRepoError):
        return HubFileMissing(
            f"{repo_id} is gated: accept its terms on the hub and log in (`hf auth login`)"
        )
    if isinstance(err, RevisionNotFoundError):
        return HubFileMissing(f"{repo_id} has no revision {rev!r}: check the @revision")
    if isinstance(err, RepositoryNotFoundError):
        return HubFileMissing(f"no repository {repo_id} on the hub: check the name")
    if isinstance(err, EntryNotFoundError):
        return HubFileMissing(f"{repo_id}@{rev} has no file {', '.join(files or [])}")
    return HubFileMissing(f"could not fetch {repo_id}@{rev}: {str(err).splitlines()[0]}")


def snapshot(ref: HubRef, patterns: list[str] | None) -> Path:
    """The local snapshot folder of ``ref`` (its sub-folder not appended) holding the files
    matching ``patterns`` (paths inside the repository; None = all files). Offline: what the
    cache holds (the folder of the commit the revision names); online: downloaded first."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                ref.repo_id,
                revision=ref.revision,
                cache_dir=cache_dir(),
                allow_patterns=patterns,
                local_files_only=offline(),
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise _hub_error(err, ref.repo_id, ref.revision, None) from None


def optional_file(ref: HubRef, filename: str) -> Path | None:
    """``filename`` (under the sub-folder) of ``ref`` as a local path, None when the repository
    does not have it (online: the hub says so; offline: the cached snapshot lacks it). The
    repository's revision must be resolvable (else :class:`HubFileMissing`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    name = ref.in_repo(filename)
    if offline():
        local = snapshot(ref, [name]) / name
        return local if local.is_file() else None
    try:
        return Path(
            hf_hub_download(ref.repo_id, name, revision=ref.revision, cache_dir=cache_dir())
        )
    except EntryNotFoundError:
        return None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
        raise _hub_error(err, ref.repo_id, ref.revision, [name]) from None


def fetch_files(uris: list[str]) -> list[Path]:
    """Local paths of ``hf://`` file URIs (in order). Offline, every file missing from the cache
    is named in one :class:`HubFileMissing` per repository; online they are downloaded."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    files = [HubFile.parse(u) for u in uris]
    out: list[Path | None] = [None] * len(files)
    cache = cache_dir()
    if offline():
        missing: dict[tuple[str, str | None], list[str]] = {}
        for i, f in enumerate(files):
            hit = try_to_load_from_cache(f.repo_id, f.path, cache_dir=cache, revision=f.revision)
            if isinstance(hit, str) and Path(hit).is_file():
                out[i] = Path(hit)
            else:
                missing.setdefault((f.repo_id, f.revision), []).append(f.path)
        if missing:
            (repo, rev), paths = next(iter(missing.items()))
            raise _not_cached(repo, rev, paths)
        return [p for p in out if p is not None]
    from tqdm import tqdm

    for i, f in enumerate(tqdm(files, desc="published transcoder files", unit="file",
                               disable=None)):  # fmt: skip
        try:
            out[i] = Path(hf_hub_download(f.repo_id, f.path, revision=f.revision, cache_dir=cache))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as err:
            raise _hub_error(err, f.repo_id, f.revision, [f.path]) from None
    return [p for p in out if p is not None]


def commit_of(snapshot_folder: Path) -> str | None:
    """The commit a snapshot folder holds (its name, in huggingface_hub's cache layout)."""
    name = Path(snapshot_folder).name
    return name if _COMMIT.match(name) else None


# --- a published transcoder: what a reference names, as local files ------------------------

# Files of each circuit-tracer layout (what is fetched for a repository of that kind).
LAYOUT_PATTERNS = {
    "cross_layer_transcoder": ("W_enc_*.safetensors", "W_dec_*.safetensors"),
    "transcoder_set": ("layer_*.safetensors",),
}
SIDE_FILES = ("config.yaml", "circuit_atlas.json")


@dataclass
class Published:
    """A transcoder named by a preset, a hub reference or a ``config.yaml`` listing files.

    folder: a local folder holding one of our layouts (None when ``files`` lists the layers).
    files: the per-layer files a ``config.yaml`` lists, in layer order (local paths).
    conf: the ``config.yaml`` settings ({} when there is none).
    name: the readable identity name (repository, sub-folder, commit), None for local files.
    model_name: the model the set was trained for, when its config or our table says.
    label: how errors name it (``org/name[/sub]@rev`` or the config file).
    """

    folder: Path | None
    files: list[Path] | None
    conf: dict
    name: str | None
    model_name: str | None
    label: str


def _listed(conf: dict, base: Path, label: str) -> list[Path]:
    """The local paths of a config's ``transcoders:`` list: hf:// URIs through the cache, other
    entries relative to the config's folder."""
    entries = conf["transcoders"]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        from transcoders.formats.files import TranscoderFormatError

        raise TranscoderFormatError(
            f"{label}: 'transcoders' should be a list of paths or hf:// URIs"
        )
    uris = [e for e in entries if e.startswith(HF_SCHEME)]
    fetched = dict(zip(uris, fetch_files(uris), strict=True)) if uris else {}
    out = []
    for e in entries:
        p = fetched.get(e) or (base / e if not Path(e).is_absolute() else Path(e))
        if not p.is_file():
            raise FileNotFoundError(f"{label} lists {e}, which does not exist: fix the list")
        out.append(p)
    return out


def _read_conf(path: Path) -> dict:
    from transcoders.formats.circuit_tracer import read_yaml_file

    return read_yaml_file(path)


def _from_config(path: Path, model_name: str | None) -> Published | None:
    """A local ``config.yaml`` (or a folder holding one) that lists per-layer files."""
    from transcoders.formats.presets import check_published_model

    conf = _read_conf(path)
    if not conf.get("transcoders"):
        return None
    trained = conf.get("model_name")
    check_published_model(str(path), trained, model_name)
    files = _listed(conf, path.parent, str(path))
    return Published(None, files, conf, None, trained, str(path))


def _from_hub(ref: HubRef, model_name: str | None, via: str | None = None) -> Published:
    from transcoders.formats.presets import PUBLISHED_TOPK, check_published_model, published_model
    from transcoders.identity import hub_name

    label = ref.label + (f" (preset {via!r})" if via else "")
    check_published_model(label, published_model(ref.repo_id), model_name)  # before any fetch
    conf_path = optional_file(ref, "config.yaml")
    conf = _read_conf(conf_path) if conf_path else {}
    trained = conf.get("model_name") or published_model(ref.repo_id)
    check_published_model(label, trained, model_name)
    topk = {k.lower(): v for k, v in PUBLISHED_TOPK.items()}.get(ref.repo_id.lower())
    if conf.get("activation") == "topk" and conf.get("k") is None and topk:
        conf["k"] = topk
    if conf.get("transcoders"):
        # Entries relative to the config are files of the same repository and revision.
        rev = f"?revision={ref.revision}" if ref.revision else ""
        conf["transcoders"] = [
            e if str(e).startswith(HF_SCHEME) or Path(str(e)).is_absolute()
            else f"{HF_SCHEME}{ref.repo_id}/{ref.in_repo(str(e))}{rev}"
            for e in conf["transcoders"]
        ]  # fmt: skip
        files = _listed(conf, conf_path.parent, label)
        commit = commit_of(snapshot(ref, [ref.in_repo("config.yaml")]))
        name = hub_name(ref.repo_id, ref.subfolder, commit or ref.revision)
        return Published(None, files, conf, name, trained, label)
    layout = LAYOUT_PATTERNS.get(str(conf.get("model_kind")))
    if layout:
        patterns = [ref.in_repo(p) for p in (*layout, *SIDE_FILES)]
    elif ref.subfolder:
        patterns = [ref.in_repo("*")]
    elif not offline():
        # Without a config.yaml nothing says which files make the transcoder: fetching the
        # whole repository could be tens of GB (GemmaScope's holds every width and L0).
        raise HubFileMissing(
            f"{label} has no config.yaml saying which files make the transcoder: name its "
            f"folder ({ref.repo_id}/path/to/folder) or give a config.yaml listing the files"
        )
    else:
        patterns = None
    root = snapshot(ref, patterns)
    folder = root / ref.subfolder if ref.subfolder else root
    if layout and not any(folder.glob(layout[0])) or not folder.is_dir():
        want = [ref.in_repo(p) for p in (layout or ("*",))]
        raise _not_cached(ref.repo_id, ref.revision, want)
    name = hub_name(ref.repo_id, ref.subfolder, commit_of(root) or ref.revision)
    return Published(folder, None, conf, name, trained, label)


def _one_file(f: HubFile, uri: str, model_name: str | None) -> Published:
    from transcoders.formats.presets import check_published_model, published_model
    from transcoders.identity import hub_name

    check_published_model(uri, published_model(f.repo_id), model_name)
    (local,) = fetch_files([uri])
    # The cache keeps the file at snapshots/<commit>/<path>: the commit names it.
    depth = len(Path(f.path).parts)
    commit = commit_of(local.parents[depth - 1]) if len(local.parents) >= depth else None
    name = hub_name(f.repo_id, f.path.rsplit(".", 1)[0], commit or f.revision)
    return Published(local, None, {}, name, published_model(f.repo_id), uri)


def resolve(source, model_name: str | None = None) -> Published | None:
    """What ``source`` names, when it is not simply a local transcoder folder or file: a preset
    (``gemma``, ``llama``), a hub reference (``org/name[/sub][@rev]``, ``hf://...``), or a local
    ``config.yaml`` (or folder with one) whose ``transcoders:`` list names per-layer files.
    None: load ``source`` as a local path. ``model_name`` (the model the transcoder will serve)
    refuses a published set trained for another model before its weights are fetched.
    Raises :class:`HubFileMissing` (one line) when files are not cached and the hub is not
    reachable, and :class:`~transcoders.formats.files.TranscoderFormatError` for an unknown
    preset."""
    from transcoders.formats.presets import preset, unknown_preset

    text = str(source)
    p = Path(text).expanduser()
    if p.exists():
        if p.is_file() and p.suffix in (".yaml", ".yml"):
            found = _from_config(p, model_name)
            if found is None:
                from transcoders.formats.files import TranscoderFormatError

                raise TranscoderFormatError(
                    f"{p} lists no transcoders: load the folder that holds the weights"
                )
            return found
        if p.is_dir() and (p / "config.yaml").is_file():
            return _from_config(p / "config.yaml", model_name)
        return None
    if (pre := preset(text)) is not None:
        return _from_hub(HubRef.parse(pre.repo), model_name, via=pre.name)
    if text.startswith(HF_SCHEME):
        f = HubFile.parse(text)
        if f.path.endswith((".npz", ".safetensors")):  # one weights file (e.g. a params.npz)
            return _one_file(f, text, model_name)
        return _from_hub(HubRef(f.repo_id, f.path.strip("/") or None, f.revision), model_name)
    if looks_like_reference(text):
        if Path(text.split("/", 1)[0]).is_dir():  # a mistyped local path reads as org/name too
            raise FileNotFoundError(
                f"transcoder path {text} does not exist: check the path (it is not read as the "
                f"hub repository {text.split('@')[0]} because a local folder "
                f"{text.split('/', 1)[0]}/ exists)"
            )
        return _from_hub(HubRef.parse(text), model_name)
    if "/" not in text and not text.startswith(("~", ".")):
        raise unknown_preset(text)
    return None
