"""Text generation: prompts and chat templates, sampling, stop strings, streaming, cancellation."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from .._runtime.capture import capacity_for
from .._runtime.limits import Limits
from ..errors import InvalidRequest

__all__ = ["GenerationParams", "build_prompt_ids", "generate"]

_MAX_STOP_CHARS = 1024
_MESSAGE_KEYS = frozenset({"role", "content", "name"})


def _number(params: Mapping[str, Any], key: str, default: Any, kind: type, low: float,
            high: float | None = None, setting: str | None = None) -> Any:
    value = params.get(key, default)
    if value is None:
        return default
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int))
            or not math.isfinite(value)):  # NaN passes every comparison below, and poisons sampling
        raise InvalidRequest(f"{key} must be {'an integer' if kind is int else 'a finite number'}, not {value!r}")
    if value < low or (high is not None and value > high):
        where = f" ({setting})" if setting else ""
        raise InvalidRequest(f"{key} must be in [{low}, {high if high is not None else 'inf'}]{where}, not {value!r}")
    return kind(value)


@attrs.frozen
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop", "do_sample",
            "ignore_eos")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], limits: Limits | None = None) -> GenerationParams:
        limits = limits or Limits()
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequest(f"stop must be a string or a list of non-empty strings, not {stop!r}")
        if len(stop) > limits.max_stop_strings:
            raise InvalidRequest(f"stop: {len(stop)} strings exceed the limit of {limits.max_stop_strings} "
                                 "(executors.ml max_stop_strings)")
        for i, s in enumerate(stop):
            # the detokenizer holds back (and re-scans) as many characters as the longest stop string
            if len(s) > _MAX_STOP_CHARS:
                raise InvalidRequest(f"stop[{i}]: {len(s)} characters exceed the limit of {_MAX_STOP_CHARS}")
        seed = params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63), not {seed!r}")
        temperature = _number(params, "temperature", 0.0, float, 0.0)
        if params.get("do_sample") is False:
            temperature = 0.0
        return cls(
            max_new_tokens=_number(params, "max_new_tokens", 128, int, 0, limits.max_new_tokens_limit,
                                   "executors.ml max_new_tokens_limit"),
            temperature=temperature,
            top_k=_number(params, "top_k", 0, int, 0),
            top_p=_number(params, "top_p", 1.0, float, 0.0, 1.0),
            repetition_penalty=_number(params, "repetition_penalty", 1.0, float, 1e-6),
            seed=seed,
            stop=tuple(stop),
            ignore_eos=_flag(params, "ignore_eos"),
        )


def _flag(params: Mapping[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be true or false, not {value!r}")
    return value


# A chat template is code from the model's files, rendered with request text: it runs sandboxed (no
# attribute starting with "_", no mutation of what it is given), and what it builds is bounded, so
# that a hostile template cannot exhaust the host's memory with a few operators.
_MAX_TEMPLATE_CHARS = 1 << 22  # of any string or list a template builds, and of its output
_MAX_POWER_BITS = 4096
_LONG_NUMBER = re.compile(r"\d{7,}")  # a width of a million or more in a format spec


def _refuse(what: str) -> Any:
    from jinja2.exceptions import SecurityError

    return SecurityError(f"chat template: {what} exceeds the bound of {_MAX_TEMPLATE_CHARS} characters")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)) and len(value) > _MAX_TEMPLATE_CHARS:
        raise _refuse(f"a {type(value).__name__} of {len(value)}")
    return value


def _check_int_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_TEMPLATE_CHARS:
            raise _refuse(f"an argument of {value}")


def _check_format(spec: Any) -> None:
    if isinstance(spec, str) and _LONG_NUMBER.search(spec):
        raise _refuse("a width in a format string")


def _bounded_binop(operator: str, left: Any, right: Any) -> Any:
    import operator as op

    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 \
                and max(abs(left), 2).bit_length() * right > _MAX_POWER_BITS:
            raise _refuse(f"{left} ** {right}")
        return left ** right
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_TEMPLATE_CHARS:
                raise _refuse(f"repeating a {type(seq).__name__} {n} times")
        return left * right
    if operator == "%":
        _check_format(left)
        return _check_size(left % right)
    if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
            and len(left) + len(right) > _MAX_TEMPLATE_CHARS:
        raise _refuse(f"joining {len(left)} and {len(right)}")
    return op.add(left, right)


_CHAT_ENVIRONMENT: Any = None


def _chat_environment_class() -> Any:
    """The jinja2 environment class chat templates render in (made once: jinja2 is imported only
    when a chat is rendered)."""
    global _CHAT_ENVIRONMENT
    if _CHAT_ENVIRONMENT is not None:
        return _CHAT_ENVIRONMENT
    import functools

    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _BoundedCodeGenerator(CodeGenerator):
        # "a ~ b" compiles to a join the sandbox does not see; route it through a bounded one
        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class _ChatEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = _BoundedCodeGenerator
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            for name, f in list(self.filters.items()):
                self.filters[name] = self._bounded_filter(f, name == "format")

        @staticmethod
        def _bounded_filter(f: Callable[..., Any], is_format: bool) -> Callable[..., Any]:
            # filters (center, indent, wordwrap, format...) are called directly by compiled code
            @functools.wraps(f)  # keeps jinja's pass_context/pass_environment marks
            def bounded(*args: Any, **kwargs: Any) -> Any:
                if is_format:
                    _check_format(next((a for a in args if isinstance(a, str)), None))
                _check_int_args(args[1:], kwargs)
                return _check_size(f(*args, **kwargs))
            return bounded

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            return _check_size(_bounded_binop(operator, left, right))

        def bounded_join(self, parts: Sequence[Any]) -> str:
            total = 0
            out = []
            for part in parts:
                text = str(part)
                total += len(text)
                if total > _MAX_TEMPLATE_CHARS:
                    raise _refuse(f"a '~' join of {total}")
                out.append(text)
            return "".join(out)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_int_args(args, kwargs)
            if getattr(__obj, "__name__", None) in ("format", "format_map") and isinstance(
                    getattr(__obj, "__self__", None), str):
                _check_format(__obj.__self__)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

    _CHAT_ENVIRONMENT = _ChatEnvironment
    return _ChatEnvironment


def _chat_environment() -> Any:
    """The jinja2 environment chat templates render in: sandboxed, immutable and bounded, with what
    transformers' ``apply_chat_template`` gives templates (so that the templates of Llama 3.x, Qwen,
    Gemma and Phi-3 files render the same text): ``raise_exception``, ``strftime_now``, a
    ``tojson`` that does not HTML-escape, ``dict``, a ``namespace`` that refuses underscore names
    and the ``{% generation %}`` block tag."""
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension
    from jinja2.utils import Namespace

    class _Generation(Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %}; here it is
        # only its content
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    class _Namespace(Namespace):
        def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick (namespace(self=...))
            self, rest = args[0], args[1:]
            values = dict(*rest, **kwargs)
            for name in values:
                _Namespace._check(name)
            Namespace.__init__(self, values)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"chat templates cannot store underscore names on a namespace ({name!r})")

    class _Dict:
        # the builtin type would hand templates a class object; this gives only what templates call
        def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        if isinstance(indent, int) and not 0 <= indent <= 16:
            raise SecurityError(f"chat template: tojson indent {indent} is outside [0, 16]")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = _chat_environment_class()(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env


_TEMPLATES: dict[str, Any] = {}
_TEMPLATES_LOCK = threading.Lock()


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], tok_config: Mapping[str, Any],
                add_generation_prompt: bool = True) -> str:
    """Render a Hugging Face chat template (jinja2, sandboxed, as transformers renders it). Whatever
    goes wrong in the template (its own ``raise_exception``, a type error, a sandbox refusal, a bound
    exceeded) is an :class:`InvalidRequest`."""

    def token(key: str) -> str:
        value = tok_config.get(key)
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    try:
        with _TEMPLATES_LOCK:  # compiled once per template text (a model's template is fixed)
            compiled = _TEMPLATES.get(template)
            if compiled is None:
                if len(_TEMPLATES) >= 64:
                    _TEMPLATES.clear()
                compiled = _TEMPLATES[template] = _chat_environment().from_string(template)
        # messages are copied to plain dicts: a template may not reach the caller's objects
        pieces = []
        total = 0
        for piece in compiled.generate(
                messages=[dict(m) for m in messages], tools=None, documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=token("bos_token"), eos_token=token("eos_token"),
                pad_token=token("pad_token"), unk_token=token("unk_token")):
            total += len(piece)
            if total > _MAX_TEMPLATE_CHARS:
                raise _refuse(f"the rendered chat ({total}+)")
            pieces.append(piece)
        return "".join(pieces)
    except InvalidRequest:
        raise
    except (Exception, MemoryError) as exc:  # a template is code: any failure in it is the request's
        raise InvalidRequest(f"chat template failed: {type(exc).__name__}: {exc}") from exc


def _check_messages(messages: Any) -> list[Mapping[str, Any]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequest(f"each message needs a string 'role' and 'content', not {m!r}")
        extra = set(m) - _MESSAGE_KEYS
        if extra:
            raise InvalidRequest(f"messages[{i}]: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                                 f"valid: {', '.join(sorted(_MESSAGE_KEYS))}")
    return list(messages)


def prompt_chars(inputs: Any) -> int:
    """Characters of text a generation request carries (prompt, or every message's content)."""
    if isinstance(inputs, str):
        return len(inputs)
    if isinstance(inputs, Mapping):
        if "messages" in inputs:
            return prompt_chars(inputs["messages"])
        prompt = inputs.get("prompt")
        return len(prompt) if isinstance(prompt, str) else 0
    total = 0
    if isinstance(inputs, (list, tuple)):
        for m in inputs:
            if isinstance(m, Mapping):
                total += sum(len(v) for v in (m.get("content"), m.get("role")) if isinstance(v, str))
    return total


def check_prompt_size(inputs: Any, limits: Limits | None = None) -> None:
    """Refuse a prompt of more than ``max_texts`` messages or ``max_text_chars`` characters."""
    limits = limits or Limits()
    count = len(inputs["messages"]) if isinstance(inputs, Mapping) and isinstance(inputs.get("messages"), list) \
        else len(inputs) if isinstance(inputs, (list, tuple)) else 1
    if count > limits.max_texts:
        raise InvalidRequest(f"inputs: {count} messages exceed the limit of {limits.max_texts} "
                             "(executors.ml max_texts)")
    chars = prompt_chars(inputs)
    limit = limits.max_text_chars
    if chars > limit:
        raise InvalidRequest(f"inputs: the prompt has {chars} characters, more than the limit of {limit} "
                             "(executors.ml max_text_chars)")


def build_prompt_ids(lm: Any, inputs: Any, limits: Limits | None = None) -> list[int]:
    """Token ids for a prompt string, ``{"prompt": ...}``, ``{"messages": [...]}`` or a list of
    messages (rendered with the tokenizer's chat template). The text is bounded by
    ``max_text_chars`` before it is rendered or tokenised."""
    check_prompt_size(inputs, limits)
    messages = None
    if isinstance(inputs, Mapping):
        extra = set(inputs) - ({"messages"} if "messages" in inputs else {"prompt"})
        if extra:
            raise InvalidRequest(f"text-generation inputs: unknown key(s) {', '.join(sorted(map(str, extra)))}; "
                                 "send {'prompt': ...} or {'messages': [...]}")
        if "messages" in inputs:
            messages = _check_messages(inputs["messages"])
        elif isinstance(inputs.get("prompt"), str):
            inputs = inputs["prompt"]
        else:
            raise InvalidRequest("text-generation inputs need 'prompt' (a string) or 'messages'")
    elif isinstance(inputs, (list, tuple)):
        messages = _check_messages(inputs)
    elif not isinstance(inputs, str):
        raise InvalidRequest(f"text-generation inputs must be a string, messages or a mapping, not "
                             f"{type(inputs).__name__}")
    tokenizer = lm.tokenizer
    ids: list[int]
    if messages is not None:
        if not lm.chat_template:
            raise InvalidRequest(f"model {lm.name!r} has no chat template; send a plain prompt")
        text = render_chat(lm.chat_template, messages, lm.tokenizer_config)
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(inputs, add_special_tokens=True).ids
        if lm.add_bos_token and lm.bos_token_id is not None and (not ids or ids[0] != lm.bos_token_id):
            ids = [lm.bos_token_id, *ids]
    if not ids:
        raise InvalidRequest("the prompt is empty after tokenization")
    return ids


def _sample(logits: Any, history: Any, p: GenerationParams, generator: Any) -> int:
    import torch

    if p.repetition_penalty != 1.0:
        scores = logits.gather(0, history)
        scores = torch.where(scores < 0, scores * p.repetition_penalty, scores / p.repetition_penalty)
        logits = logits.scatter(0, history, scores)
    if p.temperature <= 0.0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[0]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > p.top_p  # keep the token that crosses top_p
        remove[0] = False
        logits = logits.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class _Detokenizer:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 and anything
    that could still become a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to emit, stopped)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False  # an incomplete UTF-8 sequence; wait for the next token
        self.text = text
        if self.stop:
            start = max(0, self.sent - self.hold)
            cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text = text[:max(cut, self.sent)]
                piece = self.text[self.sent:]
                self.sent = len(self.text)
                return piece, True
            safe = max(self.sent, len(text) - self.hold)
        else:
            safe = len(text)
        piece = text[self.sent:safe]
        self.sent = safe
        return piece, False

    def flush(self) -> str:
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece


def generate(lm: Any, prompt_ids: list[int], p: GenerationParams, *,
             on_text: Callable[[str], None] | None = None,
             cancelled: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Generate from ``prompt_ids``; blocking (run it on a worker thread)."""
    import torch

    model = lm.model
    limit = getattr(model.config, "max_position_embeddings", 1 << 30)
    if len(prompt_ids) >= limit:
        raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; model {lm.name!r} takes at most {limit}")
    max_new = min(p.max_new_tokens, limit - len(prompt_ids))
    generator = None
    if p.temperature > 0:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(p.seed if p.seed is not None else int(torch.seed() % (1 << 63)))
    detok = _Detokenizer(lm.tokenizer, p.stop)
    tokens: list[int] = []
    finish = "length"
    stopped = False
    start = time.perf_counter()
    first_token_at = None
    capture: Any = getattr(model, "capture", None)
    captured = capture is not None and capture.active
    capacity = len(prompt_ids) + max_new
    # a captured step is traced outside inference mode (its cache must not be an inference tensor)
    with torch.no_grad() if captured else torch.inference_mode():
        # a captured step needs a cache whose capacity is one of a few (one graph per capacity)
        cache = (model.new_cache(capacity_for(capacity, limit), positions=capacity) if captured
                 else model.new_cache(capacity))
        history = torch.tensor(prompt_ids, dtype=torch.long)
        if max_new == 0:
            return _result(detok, tokens, "length", prompt_ids, start, None)
        logits = model.forward(torch.tensor([prompt_ids], dtype=torch.long, device=model.device), cache)[0]
        step_input = torch.empty((1, 1), dtype=torch.long, device=model.device)
        for _ in range(max_new):
            if cancelled():
                finish = "cancelled"
                break
            token = _sample(logits.cpu() if logits.device.type != "cpu" else logits,
                            history, p, generator)
            if first_token_at is None:
                first_token_at = time.perf_counter()
            if token in lm.eos_token_ids and not p.ignore_eos:
                finish = "stop"
                break
            tokens.append(token)
            if p.repetition_penalty != 1.0:
                history = torch.cat([history, torch.tensor([token])])
            piece, stopped = detok.add(token)
            if piece and on_text is not None:
                on_text(piece)
            if stopped:
                finish = "stop"
                break
            if len(tokens) == max_new:
                break
            step_input[0, 0] = token
            out = None
            if captured:
                position = torch.tensor([cache.length], dtype=torch.long, device=model.device)
                out = capture(step_input, position, cache.k, cache.v, cache.rope)
                captured = out is not None  # None: no compiler, or compiling failed; eager from here
            if out is not None:
                cache.length += 1
                logits = out[0]
            else:
                logits = model.forward(step_input, cache)[0]
    if not stopped:
        piece = detok.flush()
        if piece and on_text is not None:
            on_text(piece)
    return _result(detok, tokens, finish, prompt_ids, start, first_token_at)


def _result(detok: _Detokenizer, tokens: list[int], finish: str, prompt_ids: list[int], start: float,
            first: float | None) -> dict[str, Any]:
    elapsed = time.perf_counter() - start
    return {
        "text": detok.text,
        "tokens": tokens,
        "finish_reason": finish,
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens)},
        "timings": {"generate": elapsed, "first_token": (first - start) if first else None},
    }
