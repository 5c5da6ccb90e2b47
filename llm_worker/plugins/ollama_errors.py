"""What each of Ollama's error answers means, as Ollama's own source says: one table, read top to bottom.

``TABLE`` holds one ``Row`` per answer Ollama gives, each citing the Ollama
source file (and the versions) where the text or status comes from; the
source read is Ollama v0.33.0-rc2 (commit fb30760996871fa9460115c753afd2c60d4ab0f7),
older wordings from its git history. ``lookup`` returns the first row that
matches an answer, ``error_for`` the ProviderError it becomes.

The rules the order encodes:

- Messages are matched before status codes: Ollama answers the same status
  for different things (``/api/embed`` answers 400 both for a bad input and
  for a runner that crashed under it; 500 for an option of the wrong type and
  for an out-of-memory), so a status only decides when no message row matched.
  Every row with a message sign precedes every row without one.
- Permanent model errors (not found, incompatible, a capability the model
  lacks, a broken template) come first: they go to the model fallback with no
  retry, and are not the provider's failure.
- A crashed runner (Ollama's model process died, at load or mid-answer) comes
  before the memory signs, since a crash message often quotes one ("llama-server
  process has terminated: exit status 2: cudaMalloc failed: out of memory"):
  kind MEMORY with ``crashed``, so the memory strategy unloads idle models and
  tries once more, and the executor counts a crash that repeats after that.
- An out-of-memory that killed nothing (Ollama refused the load, or the
  runner failed one allocation and lives on) is MEMORY without ``crashed``.
- A refusal that is the host's configuration, not the job's (403 from Ollama's
  Host check, a base URL with a path), makes the host pause (``unreachable``)
  with a message that says what to set.

Matching is case-insensitive on the error text alone (the ``{"error": ...}``
of the answer, or of a line of a 200 stream, where there is no status).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from llm_worker.plugin.providers import ProviderError
from llm_worker.protocol.jobs import ErrorKind
from llm_worker.settings.sections import LOAD_OPTIONS

EMBED = "/api/embed"


@dataclass(frozen=True)
class Row:
    """One kind of Ollama answer and what it means for the job, the breaker and the operator.

    ``sign``: a regular expression searched for in the error text (None: any
    text); ``status``: the HTTP statuses it applies to (empty: any, including a
    stream's error line, which has none); ``endpoint``: only answers of this
    path. ``retryable`` and ``counted`` None leave them to the kind (see
    ErrorKind.retryable and breaker.COUNTED). ``advice``: what the operator
    must do, added to the error's message ({setting}, {option}, {host} filled
    in); empty when Ollama's own text says it. ``source``: where Ollama says it.
    """

    name: str
    sign: str | None
    kind: ErrorKind
    source: str
    status: frozenset[int] = frozenset()
    endpoint: str | None = None
    retryable: bool | None = None
    counted: bool | None = None
    crashed: bool = False
    unreachable: bool = False
    advice: str = ""
    pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", re.compile(self.sign, re.IGNORECASE) if self.sign else None)

    def matches(self, status: int | None, message: str, endpoint: str | None) -> bool:
        if self.status and status not in self.status:
            return False
        if self.endpoint is not None and endpoint != self.endpoint:
            return False
        return self.pattern is None or self.pattern.search(message) is not None


# Ollama's list of out-of-memory texts (llm/status.go outOfMemorySubstrings, v0.30.0+), which its
# own IsOutOfMemoryMessage looks for as lower-case substrings of an error.
OUT_OF_MEMORY = (
    "out of memory",
    "out of device memory",
    "cudamalloc failed",
    "hipmalloc failed",
    "failed to allocate",
    "allocation failed",
    "not enough memory",
    "insufficient memory",
    "vk_error_out_of_device_memory",
    "erroroutofmemory",
)

_HOST_ADVICE = (
    "Ollama refused the request with 403 and no body. Listening on loopback only, Ollama accepts a Host "
    "header that is a local name (localhost, its hostname, *.local, *.internal) or a loopback or private "
    "address, and OLLAMA_BASE_URL's host is {host!r}: set OLLAMA_BASE_URL to http://127.0.0.1:<port> or "
    "http://localhost:<port>, or start Ollama with OLLAMA_HOST=0.0.0.0 (a bind beyond loopback skips the "
    "check), or have a proxy in front of it send Host: localhost; a proxy that adds an Origin header needs "
    "that origin in Ollama's OLLAMA_ORIGINS"
)


TABLE: tuple[Row, ...] = (
    # ---- the host's configuration ---------------------------------------------------------
    Row(
        "options.type",
        r'option "(?P<option>[^"]+)" must be of type (?P<type>\w+)',
        ErrorKind.VALIDATION,
        "api/types.go Options.FromMap (v0.1.3+), answered 500 by server/routes.go scheduleRunner via "
        "handleScheduleError: Ollama refuses every call while an option has the wrong JSON type",
        retryable=False,
        counted=False,
        advice="set {option} in {setting} as Ollama's api.Runner types it (use_mmap true/false; the others integers)",
    ),
    Row(
        "config.route",
        r"^404 page not found$",
        ErrorKind.NETWORK,
        "server/routes.go GenerateRoutes: gin's plain-text answer for a path Ollama has no route for",
        retryable=True,
        counted=False,
        unreachable=True,
        advice="OLLAMA_BASE_URL must be Ollama's own address with no path (http://<host>:11434), not its /v1 or /api",
    ),
    # ---- permanent model errors: the model fallback, no retries -------------------------------
    Row(
        "model.incompatible",
        r"compatible with your version of ollama",
        ErrorKind.MODEL,
        "server/sched.go load: 'this model may be incompatible with your version of Ollama' (a model llama.cpp "
        "fails to load, v0.1.30+); server/routes.go scheduleRunner: \"'llama3.2-vision' is no longer compatible "
        'with your version of Ollama" (v0.7.0+)',
    ),
    Row(
        "model.capability",
        r"does not support (chat|generate|completion|tools|insert|vision|audio|embeddings?|thinking"
        r"|image generation)\b",
        ErrorKind.MODEL,
        "server/images.go CheckCapabilities ('<model> does not support ' + completion, tools (v0.2.6+), insert, "
        "vision, audio, embedding, thinking (v0.9.0+), image generation), 400 via handleScheduleError; "
        "server/routes.go GenerateHandler/ChatHandler '%q does not support generate|chat' (v0.3.0+) and '%q does "
        "not support thinking' (v0.12.5+); v0.24.0 runner/ollamarunner/runner.go 'this model does not support "
        "embeddings'. 'raw mode does not support "
        "template, system, or context' is a bad request, not this",
    ),
    Row(
        "model.kshift",
        r"does not support k-shift",
        ErrorKind.MODEL,
        "llm/status.go errorPrefixes 'Deepseek2 does not support K-shift' (v0.4.3+): the runner aborts when the "
        "context fills; the same job fills it again",
    ),
    Row(
        "model.template",
        r"(^|: )template: |llama-server template error: ",
        ErrorKind.MODEL,
        "server/routes.go GenerateHandler (tmpl.Execute) and chatPrompt: Go's 'template: ...' errors, 500; "
        "llm/llama_server.go ApplyChatTemplate 'llama-server template error: ...' (v0.30.0+)",
    ),
    Row(
        "model.nan",
        r"embedding contains nan or inf values",
        ErrorKind.MODEL,
        "server/routes.go normalize (v0.14.0+), answered 400 by EmbedHandler: the model's output for this input",
    ),
    Row(
        "model.cloud",
        r"ollama cloud is disabled|this server cannot run this remote model",
        ErrorKind.MODEL,
        "internal/cloud/policy.go DisabledError, 403 from server/routes.go (v0.16.2+); routes.go 'this server "
        "cannot run this remote model', 400 (v0.12.0+)",
        advice="a cloud model that this Ollama server does not run (OLLAMA_NO_CLOUD, or its host not in the remotes)",
    ),
    Row(
        "model.image_generation",
        r"image generation models are not currently supported",
        ErrorKind.MODEL,
        "server/routes.go GenerateHandler, 400 (v0.32.6+)",
    ),
    Row(
        "model.not_found",
        r"\bmodel (\"[^\"]*\"|'[^']*') not found",
        ErrorKind.MODEL,
        "server/routes.go: 404 \"model 'x' not found\" (Generate/Chat/Embed handlers, v0.0.12+) and "
        "handleScheduleError 'model \"x\" not found, try pulling it first' (v0.1.2+); both still in v0.33",
    ),
    # ---- a crashed runner: the memory strategy tries once, a repeat counts ---------------------
    Row(
        "crash.startup_oom",
        r"llama-server reported out-of-memory during startup",
        ErrorKind.MEMORY,
        "llm/llama_server.go WaitUntilRunning (v0.30.0+): llama-server died of out-of-memory while loading; "
        "Ollama has already evicted its other models and retried once (server/sched.go load, oomRetryAttempted)",
        crashed=True,
    ),
    Row(
        "crash.terminated",
        r"(llama runner|llama-server) process has terminated",
        ErrorKind.MEMORY,
        "llm/llama_server.go WaitUntilRunning 'llama-server process has terminated: exit status N[: msg]' "
        "(v0.30.0+); llm/server.go 'llama runner process has terminated: ...' (v0.0.20 to v0.25.0-rc0)",
        crashed=True,
    ),
    Row(
        "crash.gone",
        r"(llama runner|llama-server) process no longer running",
        ErrorKind.MEMORY,
        "llm/llama_server.go getServerStatus/WaitUntilRunning 'llama-server process no longer running: exit "
        "status N msg' (v0.30.0+); llm/server.go 'llama runner process no longer running: N msg' (v0.1.32 to "
        "v0.25.0-rc0)",
        crashed=True,
    ),
    Row(
        "crash.stopped",
        r"model runner has unexpectedly stopped|^post predict: |llama-server apply-template error: ",
        ErrorKind.MEMORY,
        "llm/llama_server.go Completion/Chat: the request to llama-server failed, 'model runner has unexpectedly "
        "stopped, this may be due to resource limitations...' (v0.9.1+; 'POST predict: ...' to v0.9.0); "
        "ApplyChatTemplate's 'llama-server apply-template error: ...' (v0.30.0+) is the same failure",
        crashed=True,
    ),
    Row(
        "crash.mid_answer",
        r"an error was encountered while running the model",
        ErrorKind.MEMORY,
        "llm/llama_server.go Completion/Chat: llama-server's stream ended in 'unexpected EOF' or 'forcibly "
        "closed' and Ollama closes the runner (s.Close()) (v0.4.3+, llm/server.go before v0.30)",
        crashed=True,
    ),
    Row(
        "crash.embedding",
        r"do embedding request: |error reading embed response",
        ErrorKind.MEMORY,
        "llm/llama_server.go Embedding: the call to llama-server failed ('do embedding request: EOF', v0.1.32+); "
        "server/routes.go EmbedHandler answers it 400",
        crashed=True,
    ),
    Row(
        "crash.runner_log",
        r"cuda error|rocm error|ggml_assert|signal arrived during cgo execution",
        ErrorKind.MEMORY,
        "llm/status.go errorPrefixes: the runner's own last error line (CUDA_CHECK and GGML_ASSERT abort it)",
        crashed=True,
    ),
    # ---- out of memory, nothing died: unload idle models and try again -------------------------
    Row(
        "memory.out_of_memory",
        "|".join(re.escape(sign) for sign in OUT_OF_MEMORY),
        ErrorKind.MEMORY,
        "llm/status.go outOfMemorySubstrings / IsOutOfMemoryMessage (v0.30.0+); server/sched.go "
        "expireRunnersForRuntimeOOM expires the loaded models on it",
    ),
    Row(
        "memory.requires",
        r"requires more system memory",
        ErrorKind.MEMORY,
        "llm/server.go 'model requires more system memory (X) than is available (Y)' (v0.2.2 to v0.25.0-rc0; gone in "
        "v0.30.0)",
    ),
    Row(
        "memory.full_gpu",
        r"unable to load full model on gpu",
        ErrorKind.MEMORY,
        "llm/server.go ErrLoadRequiredFull (v0.11.5+), from server/sched.go load when no other model is loaded",
    ),
    Row(
        "memory.llama_cpp",
        r"unable to allocate",
        ErrorKind.MEMORY,
        "llama.cpp's 'unable to allocate %s buffer' (vendored in v0.24.0 llama/llama.cpp/src/llama-model.cpp) "
        "and llama/llama.go 'unable to allocate batch'",
    ),
    # ---- a request that cannot succeed as sent ---------------------------------------------------
    Row(
        "request.context_length",
        r"input length exceeds|input exceeds maximum context length|input after truncation exceeds"
        r"|prompt is longer than the context length",
        ErrorKind.VALIDATION,
        "server/routes.go EmbedHandler 'the input length exceeds the context length' (v0.30.0+; v0.24.0 runners), "
        "'input after truncation exceeds maximum context length', 'input exceeds maximum context length and cannot "
        "be truncated further' (v0.12.0+), 'input length exceeds maximum context length' (v0.2.6 to v0.11.x); "
        "llm/llama_server.go 'the prompt is longer than the context length currently available...' (v0.30.9+)",
        advice="shorten the input, or raise num_ctx in {setting}",
    ),
    Row(
        "request.body",
        r"^json: |^invalid character|^unexpected end of json input|^missing request body"
        r"|^invalid input type|^raw mode does not support|^top_logprobs must be",
        ErrorKind.VALIDATION,
        "server/routes.go handlers: ShouldBindJSON's errors and their own checks, 400",
        status=frozenset({400}),
    ),
    # ---- transient: busy, a runner not ready, a load that stalled --------------------------------
    Row(
        "busy.queue",
        r"server busy, please try again",
        ErrorKind.PROVIDER,
        "server/sched.go ErrMaxQueue, 503 (v0.1.33+): OLLAMA_MAX_QUEUE requests already wait",
    ),
    Row(
        "busy.slots",
        r"no slots available after \d+ retries",
        ErrorKind.PROVIDER,
        "llm/llama_server.go getServerStatusRetry (llm/server.go since v0.1.34)",
    ),
    Row(
        "runner.not_ready",
        r"unexpected server status|llama-server error: |^server not responding$|^health resp: "
        r"|^connection refused$",
        ErrorKind.PROVIDER,
        "llm/llama_server.go getServerStatus and Completion/Embedding: the runner answers its health check with "
        "an error, or not yet",
    ),
    Row(
        "load.timeout",
        r"timed out waiting for (llama runner|llama-server) to start",
        ErrorKind.TIMEOUT,
        "llm/llama_server.go WaitUntilRunning (v0.30.0+; llm/server.go 'llama runner' v0.1.2 to v0.25.0-rc0): the "
        "load made no progress for OLLAMA_LOAD_TIMEOUT",
    ),
    # ---- by status alone, when no message said more ------------------------------------------------
    Row(
        "config.host",
        None,
        ErrorKind.NETWORK,
        "server/routes.go allowedHostsMiddleware (v0.1.29+): AbortWithStatus(403), no body, when Ollama listens "
        "on loopback and the Host header is not local; gin-contrib/cors in GenerateRoutes answers 403 to an "
        "Origin outside OLLAMA_ORIGINS (envconfig.AllowedOrigins)",
        status=frozenset({403}),
        retryable=True,
        counted=False,
        unreachable=True,
        advice=_HOST_ADVICE,
    ),
    Row(
        "embed.runtime",
        None,
        ErrorKind.PROVIDER,
        "server/routes.go EmbedHandler (v0.33): every error of the embedding call that is not an api.StatusError "
        "(a runner crash, a tokenize error, a runner not ready) is answered 400",
        status=frozenset({400}),
        endpoint=EMBED,
        retryable=True,
    ),
    Row(
        "request.invalid",
        None,
        ErrorKind.VALIDATION,
        "server/routes.go: 400 is a request Ollama refuses (bad JSON, bad values)",
        status=frozenset({400}),
    ),
    Row(
        "model.missing",
        None,
        ErrorKind.MODEL,
        "server/routes.go: 404 is a model Ollama does not have",
        status=frozenset({404}),
    ),
    Row(
        "timeout.proxy",
        None,
        ErrorKind.TIMEOUT,
        "not Ollama's (no 408 in server/routes.go): a proxy between llm-worker and Ollama gave up",
        status=frozenset({408}),
    ),
    Row(
        "busy",
        None,
        ErrorKind.PROVIDER,
        "server/routes.go handleScheduleError: 503 is ErrMaxQueue (retried within the call, then here)",
        status=frozenset({503}),
    ),
    Row(
        "server",
        None,
        ErrorKind.PROVIDER,
        "server/routes.go: any other answer (500 err.Error(), 499 'request canceled'), or a 200 stream's error "
        "line that no row above names",
    ),
)


def lookup(status: int | None, message: str, endpoint: str | None = None) -> Row:
    """The first row of TABLE that matches an answer: its status (None: a stream's error line), text and path."""
    for row in TABLE:
        if row.matches(status, message, endpoint):
            return row
    raise AssertionError("TABLE ends with a row that matches everything")  # pragma: no cover


def classify(status: int, message: str) -> ErrorKind:
    """The error kind of an answer, wherever it came from (the HTTP client's classifier)."""
    return lookup(status, message).kind


class OllamaError(ProviderError):
    """An error answer of Ollama's, with the row of TABLE that explains it (``rule``) and the operator's ``advice``."""

    def __init__(self, message: str, row: Row, *, status: int | None, advice: str) -> None:
        super().__init__(
            message,
            row.kind,
            status=status,
            retryable=row.retryable,
            unreachable=row.unreachable,
            counted=row.counted,
            crashed=row.crashed,
        )
        self.rule = row.name
        self.advice = advice


class LoadOptionsRefused(OllamaError):
    """Ollama refused a load-time option of the host's settings (``option "use_mmap" must be of type boolean``).

    Every call with those options fails the same way until the setting is
    fixed: not retried, not counted. ``setting`` names it (MODEL_LOAD_OPTIONS
    or EMBEDDING_LOAD_OPTIONS) and ``option`` the option, so the model
    manager can stop start-up on it.
    """

    def __init__(self, message: str, row: Row, *, status: int | None, advice: str, setting: str, option: str) -> None:
        super().__init__(message, row, status=status, advice=advice)
        self.setting = setting
        self.option = option


def setting_for(embedding: bool) -> str:
    """The setting whose load-time options a request to this kind of model carries."""
    return "EMBEDDING_LOAD_OPTIONS" if embedding else "MODEL_LOAD_OPTIONS"


def error_for(
    what: str, status: int | None, message: str, endpoint: str | None, *, embedding: bool = False, host: str = ""
) -> OllamaError:
    """The error an Ollama answer becomes: ``what: message``, and the row's advice where the operator must act.

    ``message`` is Ollama's error text ("" for an empty body); ``embedding``
    says whether the request went to an embedding model (which setting its
    load-time options came from); ``host``: OLLAMA_BASE_URL's host, for the
    403 advice.
    """
    row = lookup(status, message, endpoint)
    setting = setting_for(embedding)
    option = ""
    if row.name == "options.type":
        found = re.search(row.sign or "", message, re.IGNORECASE)
        option = found.group("option") if found else ""
    advice = row.advice.format(setting=setting, option=option, host=host)
    text = message or f"HTTP {status}"
    if row.name == "options.type" and option not in LOAD_OPTIONS:
        # A job's own (sampling) option of the wrong type: the job is wrong, not the settings.
        return OllamaError(f"{what}: {text}", row, status=status, advice="")
    full = f"{what}: {text}" + (f" ({advice})" if advice else "")
    if row.name == "options.type":
        return LoadOptionsRefused(full, row, status=status, advice=advice, setting=setting, option=option)
    return OllamaError(full, row, status=status, advice=advice)
