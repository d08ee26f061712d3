"""Every file format and request body tinysaver reads, declared once.

A file or a request is read only through one of these schemas: `parse` checks it whole
(types, ranges, NaN, enums, names that must not be paths, and the JSON nesting depth) and turns
the first fault into one line naming the file, the field path and the rule, e.g.
``zoo.yaml: models.resnet10t.preprocess.std[0]: must be > 0, got 0.0``. Code behind the boundary
trusts what it gets. The schemas are pydantic models, as FastAPI, Ray Serve and KServe declare
theirs; they are strict (a YAML ``"5"`` is not the number 5, ``true`` is not 1) and refuse unknown
keys, so a typo is named rather than ignored.

Units: durations in seconds, sizes in pixels, confidences and thresholds as fractions in [0, 1].
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Sequence, TypeVar, Union

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, model_validator)

from pydantic_core import PydanticCustomError

from .errors import TinysaverError, UsageError

# how deep a JSON document may nest: the deepest format here (an OIP body's nested data) needs 4
MAX_JSON_DEPTH = 32
# the resize filters a model's preprocessing may name (what tinysaver.transforms implements)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
FLOPS_COUNTERS = ("deepspeed", "torch")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=@-]*")


def _name(v: str) -> str:
    # a zoo or split name becomes a folder or a file name: never a path out of the place it is written to
    if not _NAME.fullmatch(v) or ".." in v:
        raise PydanticCustomError("rule", "must be a plain name (letters, digits and . _ + = @ -, no '/' and no '..')")
    return v


Name = Annotated[StrictStr, AfterValidator(_name)]
Number = Annotated[Union[StrictInt, StrictFloat], Field(allow_inf_nan=False)]
Positive = Annotated[Union[StrictInt, StrictFloat], Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[Union[StrictInt, StrictFloat], Field(ge=0, le=1, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=1)]
Text = Annotated[StrictStr, Field(min_length=1)]


class Schema(BaseModel):
    """Strict, closed and frozen: what every format below shares."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


# -- a model's preprocessing (zoo manifests, profile configs)

class PreprocessSchema(Schema):
    """Eval-time preprocessing as a zoo records it: ``input_size`` (channels, height, width) in pixels."""

    input_size: Annotated[list[Count], Field(min_length=3, max_length=3)]
    crop_pct: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, le=1, allow_inf_nan=False)]
    interpolation: Literal[INTERPOLATIONS]  # type: ignore[valid-type]
    mean: list[Number]
    std: list[Positive]

    @model_validator(mode="after")
    def _one_per_channel(self):
        c = self.input_size[0]
        if len(self.mean) != c or len(self.std) != c:
            raise PydanticCustomError("rule", "mean and std need one value per input channel ({c})", {"c": c})
        return self


class PreprocessOverride(Schema):
    """Overrides of a model's data config in a profile config: any of `PreprocessSchema`'s fields."""

    input_size: Annotated[list[Count], Field(min_length=3, max_length=3)] | None = None
    crop_pct: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    interpolation: Literal[INTERPOLATIONS] | None = None  # type: ignore[valid-type]
    mean: list[Number] | None = None
    std: list[Positive] | None = None


# -- the profile config (zoo_index/configs/*.yaml)

class ModelSpecSchema(Schema):
    """One model to profile: a registry name, or a local checkpoint of that architecture."""

    name: Text
    pretrained: StrictBool = False
    checkpoint: Text | None = None
    num_classes: Annotated[StrictInt, Field(ge=2)] | None = None
    in_chans: Count | None = None
    input_size: Count | None = None
    label: Annotated[Text, AfterValidator(lambda v: _label(v))] | None = None
    kwargs: dict[StrictStr, Any] | None = None
    preprocess: PreprocessOverride | None = None


def _label(v: str) -> str:
    if "\x00" in v or v.startswith(("/", ".")) or "/../" in f"/{v}/":
        raise PydanticCustomError("rule", "must be a model name, not a path")
    return v


class ProfileConfigSchema(Schema):
    """What ``tinysaver profile`` reads: a zoo name, splits (name → dataset URI) and models."""

    zoo: Name
    splits: Annotated[dict[Name, Text], Field(min_length=1)]
    models: Annotated[list[Union[Text, ModelSpecSchema]], Field(min_length=1)]
    batch_sizes: list[Count] = [1, 32]
    eval_batch_size: Count = 64
    topk: Count = 5
    save_logits: StrictBool = False
    flops_counter: Literal[FLOPS_COUNTERS] = "deepspeed"  # type: ignore[valid-type]
    device: Text = "cpu"
    latency_min_run_time: Positive = 0.5
    limit: Count | None = None
    description: StrictStr = ""
    split_sizes: dict[Name, Count] | None = None
    force: StrictBool = False
    restart: StrictBool = False
    max_pixels: Count | None = None

    @model_validator(mode="after")
    def _unique_models(self):
        keys = [m if isinstance(m, str) else (m.label or m.name) for m in self.models]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise PydanticCustomError("rule", "model names must be unique in a zoo; repeated: {dup}", {"dup": ", ".join(dup)})
        return self


# -- the zoo manifest (zoo_index/<zoo>/zoo.yaml) and its model entries

STATUSES = ("measured", "imported", "published")  # profiled here, predictions made elsewhere, or a published table's
IMAGENET_CLASSES = "imagenet"  # how a split stores ImageNet's 1000 class names: one word, not 1000 lines


def _yaml_number(v: Any) -> Any:
    # PyYAML reads 1.5e6 (no sign after the e) as text: a user who wrote a number is told why it is text
    if isinstance(v, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE]\d+", v.strip()):
        raise PydanticCustomError("rule", "must be a number (YAML reads 1.5e6 as text: write 1.5e+6 or 1500000)")
    return v


Amount = Annotated[Union[StrictInt, StrictFloat], BeforeValidator(_yaml_number), Field(gt=0, allow_inf_nan=False)]


def _batch_key(v: str) -> str:
    if not (v.startswith("bs") and v[2:].isdigit() and int(v[2:]) >= 1):
        raise PydanticCustomError("rule", "must be a batch size key (bs1, bs32, …)")
    return v


def _backend_name(v: str) -> str:
    from .backends import BACKENDS  # the registered backends: modules of that package, found when asked

    if v not in BACKENDS:
        raise PydanticCustomError("rule", "must be a backend ({names})", {"names": ", ".join(BACKENDS)})
    return v


_RECORD = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)  # a record keeps fields it adds


class LatencyRow(Schema):
    model_config = _RECORD

    ms_per_batch: Amount


class LatencySchema(Schema):
    """Latency measured for one model on one backend: milliseconds per batch, keyed ``bs<N>``."""

    model_config = _RECORD

    table: dict[Annotated[StrictStr, AfterValidator(_batch_key)], LatencyRow] = {}


class BackendRecord(Schema):
    model_config = _RECORD

    latency: LatencySchema | None = None


class CalibrationSchema(Schema):
    model_config = _RECORD

    temperature: Amount | None = None


class ModelEntrySchema(Schema):
    """One model of a zoo manifest; units: ``params`` parameters, ``flops``/``macs`` per image,
    ``accuracy`` a fraction per split. ``source`` says how to build it (see ``models.ModelSpec``)."""

    key: Text | None = None
    status: Literal[STATUSES]  # type: ignore[valid-type]
    source: dict[StrictStr, Any] | None = None
    num_classes: Annotated[StrictInt, BeforeValidator(_yaml_number), Field(ge=2)] | None = None
    preprocess: PreprocessSchema | None = None
    params: Annotated[StrictInt, BeforeValidator(_yaml_number), Field(gt=0)] | None = None
    flops: Amount | None = None
    macs: Amount | None = None
    flops_counter: Text | None = None
    latency: LatencySchema | None = None
    accuracy: dict[StrictStr, Fraction | None] | None = None
    calibration: CalibrationSchema | None = None
    backends: dict[Annotated[StrictStr, AfterValidator(_backend_name)], BackendRecord] | None = None
    published: dict[StrictStr, Any] | None = None
    profiled_on: Text | None = None  # "ray" when profile --executor ray measured it
    imported: dict[StrictStr, Any] | None = None  # the record files, their format, where the costs came from
    trained: dict[StrictStr, Any] | None = None  # a saver fine-tuned to defer: from, for, settings, choice


class SplitRecord(Schema):
    """A labelled image set of a zoo: its fingerprint (labels and order) and its class names."""

    model_config = _RECORD

    fingerprint: Text
    samples: Annotated[StrictInt, Field(ge=0)] | None = None
    class_names: Union[Literal[IMAGENET_CLASSES], list[StrictStr], None] = None  # type: ignore[valid-type]


class ZooManifestSchema(Schema):
    """``zoo.yaml``: the zoo's splits and models; each model's entry is a `ModelEntrySchema`."""

    name: Text | None = None
    description: StrictStr | None = None
    splits: dict[Name, SplitRecord] | None = None
    models: dict[Text, dict[StrictStr, Any]] | None = None  # each entry is read as a ModelEntrySchema, by name


# -- the selection file (tinysaver query --save)

class StageSchema(Schema):
    model: Text
    threshold: Fraction | None
    temperature: Positive = 1.0


class GearSchema(Schema):
    threshold: Fraction
    max_loss: Annotated[Number, Field(ge=0)]
    exit_ratio: Fraction
    cost: Annotated[Number, Field(ge=0)]


class GearPlanSchema(Schema):
    """A selection's gears (`tinysaver.gears.GearPlan`), most expensive first."""

    saver: Text
    base: Text
    max_loss: Positive
    delta: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, lt=1, allow_inf_nan=False)]
    levels: Count
    cost_metric: Text
    calib_samples: Annotated[StrictInt, Field(ge=0)]
    gears: Annotated[list[GearSchema], Field(min_length=2)]
    method: Text = "wsr"
    message: StrictStr = ""


class SelectionSchema(Schema):
    """A saved selection: its policy (``stages``, the base last with threshold null) and the statistics it
    was chosen with. The statistics are a record; ``infer`` and ``serve`` recompute them from the zoo.
    Version 2 is version 1 with ``gears`` (written only when the selection carries a gear plan)."""

    schema_version: Literal[1, 2]
    zoo: Text
    base: Text
    stages: Annotated[list[StageSchema], Field(min_length=1)]
    criterion: Text = "zero"  # criteria.DEFAULT_CRITERION (schemas import nothing of the selector)
    tolerance: Annotated[Number, Field(ge=0)] = 0.0
    delta: Annotated[Union[StrictInt, StrictFloat], Field(gt=0, lt=1, allow_inf_nan=False)] | None = None
    cost_metric: Text = "flops"
    target: Text = "labels"
    calib_split: StrictStr | None = None
    test_split: StrictStr | None = None
    cost_base: Annotated[Number, Field(ge=0)] | None = None
    cost_cascade: Annotated[Number, Field(ge=0)] | None = None
    exit_ratio_calib: list[Fraction] = []
    acc_base_calib: Fraction | None = None
    acc_cascade_calib: Fraction | None = None
    exit_ratio_test: list[Fraction] | None = None
    acc_base_test: Fraction | None = None
    acc_cascade_test: Fraction | None = None
    near_threshold_calib: list[Annotated[StrictInt, Field(ge=0)]] = []
    calib_samples: Annotated[StrictInt, Field(ge=0)] | None = None
    cp_bound_points: Annotated[Number, Field(ge=0)] | None = None
    guarantee: StrictStr = ""
    message: StrictStr = ""
    gears: GearPlanSchema | None = None


# -- ESN training settings (esn/configs/*.yaml) and the metadata of an ESN checkpoint

GRANULARITIES = ("stage", "block")  # where a base is cut into the parts whose features feed exits


class ESNSettingsSchema(Schema):
    """ESN training settings; a field left out takes ``esn.train.TrainSettings``'s default."""

    epochs: Count | None = None
    batch_size: Count | None = None
    lr: Positive | None = None
    weight_decay: Annotated[Number, Field(ge=0)] | None = None
    warmup_epochs: Annotated[Number, Field(ge=0)] | None = None
    num_layers: Annotated[StrictInt, Field(ge=0, le=3)] | None = None
    dim: Count | None = None
    num_heads: Count | None = None
    granularity: Literal[GRANULARITIES] | None = None  # type: ignore[valid-type]
    autoaugment: StrictBool | None = None
    mixup: Annotated[Number, Field(ge=0)] | None = None
    cutmix: Annotated[Number, Field(ge=0)] | None = None
    feature_cache: StrictBool | None = None
    train_split: Name | None = None
    train_limit: Count | None = None
    seed: Annotated[StrictInt, Field(ge=0)] | None = None
    label_free: StrictBool | None = None


class ESNConfigSchema(Schema):
    """The shape of an exit sequence network: feature sizes in, classes out."""

    saver_dim: Count
    stage_dims: Annotated[list[Count], Field(min_length=1, max_length=64)]
    num_classes: Annotated[StrictInt, Field(ge=2)]
    dim: Count = 128
    num_layers: Annotated[StrictInt, Field(ge=0, le=3)] = 1
    num_heads: Count = 8
    dropout: Annotated[Number, Field(ge=0, lt=1)] = 0.0


class ESNCheckpointSchema(Schema):
    """What an ESN checkpoint records beside its weights; keys training added (``history``, …) pass."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=True)

    state_dict: dict[StrictStr, Any]
    config: ESNConfigSchema
    settings: ESNSettingsSchema
    zoo: Text
    saver: Text
    base: Text


# -- the Open Inference Protocol's infer body (KServe v2, JSON part)

class OIPParameters(Schema):
    """The parameters the protocol's extensions define, typed; others (a client's own) pass as they are."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True, allow_inf_nan=False)

    binary_data_output: StrictBool | None = None
    binary_data: StrictBool | None = None
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None
    classification: Annotated[StrictInt, Field(ge=0)] | None = None


# clients add fields of their own (kserve's model_name, say): those are let through, the protocol's typed
_OPEN = ConfigDict(extra="ignore", strict=True, frozen=True, allow_inf_nan=False)


class OIPInput(Schema):
    model_config = _OPEN

    name: StrictStr
    shape: Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1, max_length=8)]
    datatype: StrictStr
    parameters: OIPParameters | None = None
    data: Any = None


class OIPOutput(Schema):
    model_config = _OPEN

    name: StrictStr
    parameters: OIPParameters | None = None


class OIPRequestSchema(Schema):
    """The JSON of ``POST /v2/models/{name}/infer``: one BYTES input of encoded images."""

    model_config = _OPEN

    id: Union[StrictStr, StrictInt, None] = None
    inputs: Annotated[list[OIPInput], Field(min_length=1)]
    outputs: list[OIPOutput] | None = None
    parameters: OIPParameters | None = None


# -- reading

S = TypeVar("S", bound=BaseModel)


def field_path(loc: Sequence[Any]) -> str:
    """``('models', 0, 'std', 1)`` → ``models[0].std[1]``: the path a user looks for in the file."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_member(part):
            continue  # which member of a union pydantic tried: noise to a reader
        else:
            out += f".{part}" if out else str(part)
    return out


def _is_member(part: Any) -> bool:
    p = str(part)
    return p in ("int", "float", "str", "bool", "list", "dict") or "[" in p or p.startswith(
        ("constrained-", "function-after", "lax-", "tagged-union", "literal[")) or p in _schema_names()


def _schema_names() -> set[str]:
    seen, todo = set(), [Schema]
    while todo:
        c = todo.pop()
        seen.add(c.__name__)
        todo.extend(c.__subclasses__())
    return seen


def _shown(v: Any) -> str:
    if isinstance(v, str):
        return repr(v if len(v) <= 40 else v[:40] + "…") + " (text)"
    if isinstance(v, (dict, list)):
        short = repr(v) if len(repr(v)) <= 40 else ""
        return short or (f"a mapping of {len(v)} keys" if isinstance(v, dict) else f"a list of {len(v)} items")
    if v is None:
        return "nothing"
    return repr(v)


_RULES = (  # pydantic's wording → ours
    (re.compile(r"^Input should be a valid (integer|number)(,.*)?$"), lambda m: f"must be {'an integer' if m.group(1) == 'integer' else 'a number'}"),
    (re.compile(r"^Input should be a valid (string|boolean|list|dictionary)$"),
     lambda m: "must be " + {"string": "text", "boolean": "true or false", "list": "a list",
                             "dictionary": "a mapping"}[m.group(1)]),
    (re.compile(r"^Input should be (greater|less) than( or equal to)? (.+)$"),
     lambda m: f"must be {'>' if m.group(1) == 'greater' else '<'}{'=' if m.group(2) else ''} {m.group(3)}"),
    (re.compile(r"^Input should be a valid dictionary.*$"), lambda m: "must be a mapping"),
    (re.compile(r"^Input should be a finite number$"), lambda m: "must be a finite number (not NaN or infinity)"),
    (re.compile(r"^Input should be (.+)$"), lambda m: f"must be {m.group(1)}"),
    (re.compile(r"^Extra inputs are not permitted$"), lambda m: "is not a known field"),
    (re.compile(r"^Field required$"), lambda m: "is required"),
    (re.compile(r"^(List|Dictionary) should have at least (\d+) items?.*$"),
     lambda m: f"needs at least {m.group(2)} item{'s' if m.group(2) != '1' else ''}"),
    (re.compile(r"^(List|Dictionary) should have at most (\d+) items?.*$"),
     lambda m: f"holds at most {m.group(2)} item{'s' if m.group(2) != '1' else ''}"),
    (re.compile(r"^String should have at least 1 character$"), lambda m: "must not be empty"),
    (re.compile(r"^Value error, (.+)$"), lambda m: m.group(1)),
)


def rule_of(error: dict) -> str:
    """One pydantic error as ``path: rule, got value``."""
    msg = error.get("msg", "")
    for pattern, say in _RULES:
        m = pattern.match(msg)
        if m:
            msg = say(m)
            break
    path = field_path(error.get("loc", ()))
    # a rule about a whole mapping (mean and std per channel) names it; its keys would say nothing more
    whole = error.get("type") == "rule" and isinstance(error.get("input"), dict)
    got = "" if error.get("type") in ("missing", "value_error", "extra_forbidden") or not path or whole \
        else f", got {_shown(error.get('input'))}"
    return f"{path}: {msg}{got}" if path else f"{msg}{got}"


def parse(schema: type[S], data: Any, where: str, error: type[TinysaverError] = UsageError, at: str = "") -> S:
    """``data`` read as ``schema``; the first fault raises ``error`` as one line, ``where: path: rule``.
    ``at``: the path of ``data`` inside its file (``models.resnet10t.preprocess``), put before the field's."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # a union reports one error per member: the member a user meant is the one whose path goes
        # deepest, and a float's "finite number" says more than an int's "integer" about a NaN
        first = max(errors, key=lambda err: (_depth(err["loc"]), err["type"] != "int_type"))
        here = field_path(first["loc"])
        others = {p for p in map(lambda err: field_path(err["loc"]), errors) if p != here and not here.startswith(p)}
        more = f" (and {len(others)} more)" if others else ""
        rule = rule_of(first)
        if at:  # the field's path continues the data's own: models.x.preprocess + std[0]
            rule = f"{at}{'' if rule.startswith('[') else '.' if _at_field(first) else ': '}{rule}"
        raise error(f"{where}: {rule}{more}") from None


def _at_field(error: dict) -> bool:
    return bool(field_path(error.get("loc", ())))


def _depth(loc: Sequence[Any]) -> int:
    return sum(not _is_member(p) for p in loc)


def json_depth_ok(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` (parsed JSON) nests at most ``limit`` deep; walked without recursion."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > limit:
            return False
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return True


def load_json(text: str | bytes, where: str, error: type[TinysaverError] = UsageError) -> Any:
    """JSON text parsed, with its nesting depth bounded: one line for what is not JSON or nests too deep."""
    try:
        obj = json.loads(text)
    except RecursionError:
        raise error(f"{where}: nested more than {MAX_JSON_DEPTH} deep") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not json_depth_ok(obj):
        raise error(f"{where}: nested more than {MAX_JSON_DEPTH} deep")
    return obj


__all__ = ["ESNCheckpointSchema", "ESNConfigSchema", "ESNSettingsSchema", "FLOPS_COUNTERS", "IMAGENET_CLASSES", "GRANULARITIES", "INTERPOLATIONS", "MAX_JSON_DEPTH", "ModelSpecSchema", "Name", "OIPInput", "OIPOutput",
           "OIPRequestSchema", "PreprocessOverride", "PreprocessSchema", "ProfileConfigSchema", "Schema",
           "SelectionSchema", "StageSchema", "STATUSES", "ModelEntrySchema", "ZooManifestSchema", "SplitRecord", "LatencySchema", "field_path", "json_depth_ok", "load_json", "parse", "rule_of"]
