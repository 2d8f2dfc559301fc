"""Configuration pieces shared by the relay and the agent.

Theory of operation: each program has one pydantic-settings model, loaded once at start-up from a TOML
file with environment overrides (``load_toml_settings``) and then passed down as a typed, frozen object.
Sources, strongest first: explicit init arguments, environment (``<PREFIX>SECTION__KEY``), the TOML file.
Unknown keys are refused everywhere so a typo fails loudly instead of silently falling back to a default.

Every failure to load becomes one :class:`ConfigError` whose message lists each wrong key as a dotted
path (``listeners.0.routes.1.called_ae: ...``) and why, so an operator can fix the file in one pass.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_type_hints

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from tunnel_core.limits import MuxLimits

__all__ = [
    "AE_TITLE_ANY",
    "NAME_PATTERN",
    "AETitle",
    "CallingAEList",
    "ConfigError",
    "DicomIngressConfig",
    "EndpointConfig",
    "KeyProblem",
    "MuxConfig",
    "Name",
    "Port",
    "Seconds",
    "StrictModel",
    "TomlSettings",
    "hosts_overlap",
    "load_toml_settings",
    "require_unique",
    "validate_ae_title",
    "validate_name",
]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
AE_TITLE_ANY = "*"
_AE_TITLE_MAX = 16
_AE_TITLE_MESSAGE = "AE title must be 1-16 printable ASCII characters, no backslash"


class ConfigError(Exception):
    """The configuration could not be loaded. ``problems`` holds ``(dotted_key, reason)`` pairs."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = [f"invalid configuration ({source}):"]
        lines += [f"  {key}: {reason}" if key else f"  {reason}" for key, reason in self.problems]
        super().__init__("\n".join(lines))


class KeyProblem(ValueError):
    """Raised by cross-field validators to blame a key below the model being validated.

    A model validator's errors are located at the model itself; ``loc`` names the offending key
    relative to that model so :class:`ConfigError` can print the full dotted path.
    """

    def __init__(self, loc: tuple[str | int, ...], reason: str) -> None:
        super().__init__(reason)
        self.loc = loc
        self.reason = reason


# --- field types -------------------------------------------------------------------------------


def validate_ae_title(value: str) -> str:
    """Return the AE title without its surrounding spaces, or raise ``ValueError``.

    Rules (PS3.5 AE VR): 1-16 characters of printable ASCII, no backslash, not all spaces.
    """
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title must not be empty or all spaces")
    printable = all(0x20 <= ord(ch) <= 0x7E for ch in stripped)
    if len(stripped) > _AE_TITLE_MAX or not printable or "\\" in stripped:
        raise ValueError(_AE_TITLE_MESSAGE)
    return stripped


def validate_name(value: str) -> str:
    """Site, route and listener names: lower-case letters, digits and dashes, 1-63 characters."""
    if not NAME_PATTERN.fullmatch(value):
        raise ValueError("must be 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit")
    return value


def _validate_calling_aes(values: list[str]) -> list[str]:
    if not values:
        raise ValueError(f'must list at least one calling AE title (use ["{AE_TITLE_ANY}"] to allow any)')
    if AE_TITLE_ANY in values:
        if len(values) != 1:
            raise ValueError(f'"{AE_TITLE_ANY}" must be the only entry when present')
        return values
    return [validate_ae_title(v) for v in values]


AETitle = Annotated[str, AfterValidator(validate_ae_title)]
Name = Annotated[str, AfterValidator(validate_name)]
CallingAEList = Annotated[list[str], AfterValidator(_validate_calling_aes)]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
Host = Annotated[str, Field(min_length=1, max_length=253)]


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointConfig(StrictModel):
    """A local TCP listening address."""

    host: Host = "127.0.0.1"
    port: Port


class DicomIngressConfig(StrictModel):
    """A DICOM listening socket: who may connect is decided by routing, these are the socket limits."""

    host: Host = "0.0.0.0"
    port: Port = 11112
    artim_timeout: Seconds = 10.0
    # The smallest valid A-ASSOCIATE-RQ is 74 bytes; anything above this cap is refused before buffering.
    max_associate_rq: Annotated[int, Field(ge=74, le=64 * 1024 * 1024)] = 1024 * 1024


class _MuxConfigBase(StrictModel):
    @model_validator(mode="after")
    def _limits_are_consistent(self) -> _MuxConfigBase:
        self.to_limits()  # MuxLimits checks the cross-field rules; its ValueError becomes a config error
        return self

    def to_limits(self) -> MuxLimits:
        return MuxLimits(**self.model_dump())


def _mux_config_fields() -> dict[str, Any]:
    # Generated from the dataclass so the [mux] section can never drift from MuxLimits: same names,
    # same types, same defaults. Sizes and counts must be positive; MuxLimits checks the rest.
    hints = get_type_hints(MuxLimits)
    specs: dict[str, Any] = {}
    for field in dataclasses.fields(MuxLimits):
        annotation = hints[field.name]
        if annotation is int:
            annotation = Annotated[int, Field(ge=1)]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        specs[field.name] = (annotation, default)
    return specs


MuxConfig = create_model(
    "MuxConfig",
    __base__=_MuxConfigBase,
    __module__=__name__,
    __doc__="The ``[mux]`` section: one key per ``MuxLimits`` field, same defaults; see ``to_limits()``.",
    **_mux_config_fields(),
)


_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})


def hosts_overlap(a: str, b: str) -> bool:
    """Whether two listening hosts would collide on the same port (equal, or either is a wildcard)."""
    return a == b or a in _WILDCARD_HOSTS or b in _WILDCARD_HOSTS


def require_unique(items: Sequence[Any], key: str, where: tuple[str | int, ...], what: str) -> None:
    """Raise :class:`KeyProblem` at ``where.<index>.<key>`` for the first repeated ``getattr(item, key)``."""
    seen: set[Any] = set()
    for index, item in enumerate(items):
        value = getattr(item, key)
        if value in seen:
            raise KeyProblem((*where, index, key), f"duplicate {what} {value!r}")
        seen.add(value)


# --- loading -----------------------------------------------------------------------------------

# The TOML path for the load in progress. A context variable (not a class attribute) so two loads in
# different threads or tasks cannot see each other's file.
_toml_path: ContextVar[Path | None] = ContextVar("tunnel_toml_path", default=None)


class TomlSettings(BaseSettings):
    """Base for a program's settings: TOML file plus environment overrides (``__`` nests sections).

    Subclasses set ``env_prefix``. Load with :func:`load_toml_settings`, not by calling the class.
    """

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_nested_delimiter="__",
        case_sensitive=False,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_toml_path.get())
        return (init_settings, env_settings, toml)


S = TypeVar("S", bound=TomlSettings)


def load_toml_settings(cls: type[S], path: Path | None) -> S:
    """Load ``cls`` from the TOML file at ``path`` (or defaults when None) with environment overrides.

    Raises :class:`ConfigError` for a missing or unreadable file, a TOML syntax error (message carries
    the line and column), or any invalid, missing or unknown key.
    """
    source = str(path) if path is not None else "defaults and environment"
    if path is not None and not path.is_file():
        raise ConfigError(source, [("", f"configuration file not found: {path}")])
    token = _toml_path.set(path)
    try:
        return cls()
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [("", f"TOML syntax error: {exc}")]) from exc
    except OSError as exc:
        raise ConfigError(source, [("", f"cannot read configuration file: {exc.strerror or exc}")]) from exc
    except SettingsError as exc:
        raise ConfigError(source, [("", f"bad environment override: {exc}")]) from exc
    except ValidationError as exc:
        env_prefix = str(cls.model_config.get("env_prefix", ""))
        raise ConfigError(source, list(_problems(exc, env_prefix, os.environ))) from exc
    finally:
        _toml_path.reset(token)


_FRIENDLY = {
    "extra_forbidden": "unknown key (misspelt, or in the wrong section?)",
    "missing": "required key is missing",
}


def _problems(exc: ValidationError, env_prefix: str, environ: Mapping[str, str]) -> Iterator[tuple[str, str]]:
    for error in exc.errors():
        loc: tuple[Any, ...] = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, KeyProblem):
            loc, reason = loc + cause.loc, cause.reason
        elif error["type"] == "value_error" and cause is not None:
            reason = str(cause)
        else:
            reason = _FRIENDLY.get(error["type"], error["msg"])
        key = ".".join(str(part) for part in loc)
        yield key, reason + _env_hint(loc, env_prefix, environ)


def _env_hint(loc: tuple[Any, ...], env_prefix: str, environ: Mapping[str, str]) -> str:
    """Name the environment variable when the bad value came from there rather than the file."""
    if not env_prefix or not loc:
        return ""
    for depth in range(len(loc), 0, -1):
        name = (env_prefix + "__".join(str(part) for part in loc[:depth])).upper()
        if any(key.upper() == name for key in environ):
            return f" (from environment variable {name})"
    return ""
