"""Several inference servers per host: settings, endpoint names, routing, breakers and pauses per endpoint.

Shared memory is real (a SharedState, as the supervisor maps it); the
providers are the built-in plugins' own objects, which route without a call.
The service with two real simulators is in test_endpoints_service.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from llm_worker.host.backpressure import Reachability, pause_reason
from llm_worker.host.breaker import Breakers, Transition, breaker_record
from llm_worker.host.endpoints import EndpointTable
from llm_worker.host.layout import MAX_ENDPOINTS, Call, Pause
from llm_worker.host.loadboard import LoadBoard, can_load_without_evicting_busy, resident_labels
from llm_worker.host.routing import Candidate, Router, choose
from llm_worker.host.shm import SharedState
from llm_worker.http.liveprobe import whole
from llm_worker.http.metrics import ShmCollector
from llm_worker.models.endpoints import spread
from llm_worker.models.policy import Memory, endpoint_share
from llm_worker.plugin.providers import Health, ProviderError, endpoint_names, endpoint_of
from llm_worker.plugins.ollama import llm_worker_providers as ollama_providers
from llm_worker.plugins.openai import llm_worker_providers as openai_providers
from llm_worker.protocol.jobs import ErrorKind
from llm_worker.settings import config
from llm_worker.settings.config import SettingError
from llm_worker.settings.urls import split_urls

A, B = "http://127.0.0.1:9", "http://127.0.0.1:10"  # nothing listens: routing never calls
FAIL = ProviderError("HTTP 500", ErrorKind.PROVIDER, status=500)


def load(**env: str) -> config.Settings:
    return config.load({"REDIS_URL": "redis://127.0.0.1:1/0", **env}).settings


def refused(**env: str) -> SettingError:
    with pytest.raises(SettingError) as caught:
        config.load(env)
    return caught.value


# ---- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["OLLAMA_BASE_URL", "OPENAI_BASE_URL"])
def test_a_provider_url_setting_takes_several_servers(name: str) -> None:
    settings = load(**{name: f"{A}, {B}/"})
    section = settings.ollama if name == "OLLAMA_BASE_URL" else settings.openai
    assert split_urls(section.base_url) == [A, B]


@pytest.mark.parametrize("name", ["OLLAMA_BASE_URL", "OPENAI_BASE_URL"])
def test_a_server_named_twice_is_refused_naming_the_variable_the_value_and_what_is_allowed(name: str) -> None:
    error = refused(**{name: f"{A},{B},{A}/"})
    assert (error.source, error.value) == (name, f"{A},{B},{A}/")
    assert error.allowed == f"different servers, each named once; {A} is named twice"


def test_more_servers_than_the_shared_tables_hold_are_refused() -> None:
    urls = ",".join(f"http://10.0.0.{i}:11434" for i in range(MAX_ENDPOINTS + 1))
    error = refused(OLLAMA_BASE_URL=urls)
    assert error.source == "OLLAMA_BASE_URL" and f"at most {MAX_ENDPOINTS}" in error.allowed
    assert load(OLLAMA_BASE_URL=urls.rpartition(",")[0])  # the most there is room for


@pytest.mark.parametrize("value", [f"{A},", f"{A},,{B}", f"{A},ftp://x:1", f"{A} {B}", f"{A},localhost:11434"])
def test_each_url_of_the_list_is_checked_as_one_url_is(value: str) -> None:
    error = refused(OLLAMA_BASE_URL=value)
    assert error.source == "OLLAMA_BASE_URL" and "text matching `^https?://" in error.allowed


def test_credentials_in_any_one_of_the_urls_are_refused_and_not_shown() -> None:
    error = refused(OPENAI_BASE_URL=f"{A}/v1,https://bob:s3cr3t@llm.internal/v1")
    assert "s3cr3t" not in str(error) and "no user:password@" in error.allowed


# ---- endpoints: names, providers, the shared table ----------------------------------------------------------


def test_one_server_keeps_the_providers_name_several_are_numbered_from_one() -> None:
    assert endpoint_names("ollama", 1) == ["ollama"]
    assert endpoint_names("ollama", 3) == ["ollama@1", "ollama@2", "ollama@3"]


def test_the_plugins_make_one_provider_per_server() -> None:
    one = ollama_providers(load(OLLAMA_BASE_URL=A))
    assert [(p.name, endpoint_of(p), p.url) for p in one] == [("ollama", "ollama", A)]
    two = ollama_providers(load(OLLAMA_BASE_URL=f"{A},{B}"))
    assert [(p.name, endpoint_of(p), p.url) for p in two] == [("ollama", "ollama@1", A), ("ollama", "ollama@2", B)]
    openai = openai_providers(load(OPENAI_BASE_URL=f"{A}/v1,{B}/v1", OPENAI_MAX_CONCURRENT="1"))
    assert [endpoint_of(p) for p in openai] == ["openai@1", "openai@2"]
    assert all(p.max_concurrent == 1 for p in openai)  # per server: each has its own slot
    assert openai_providers(load()) == []


def test_every_process_numbers_an_endpoint_alike_and_the_table_says_which_are_shared() -> None:
    state = SharedState(2)
    mine, theirs = EndpointTable(state.providers, state.lock), EndpointTable(state.providers, state.lock)
    assert mine.register("ollama@1", "ollama", A) == 0 and mine.register("ollama@2", "ollama", B) == 1
    assert theirs.register("openai", "openai", "http://x/v1") == 2 and theirs.find("ollama@2") == 1
    rows = {e.name: e for e in mine.all()}
    assert rows["ollama@2"].label == B and rows["openai"].label is None  # a lone server gets no metrics label


# ---- routing ------------------------------------------------------------------------------------------------


def candidate(position: int, **kw: Any) -> Candidate:
    values: dict[str, Any] = {
        "usable": True,
        "avoided": False,
        "resident": False,
        "loading": False,
        "free_slots": 1,
        "busy": 0,
        "room": 1,
        "idle": 0,
    }
    return Candidate(position=position, **{**values, **kw})


def chosen(*candidates: Candidate) -> int | None:
    picked = choose(candidates)
    return None if picked is None else picked.position


def test_routing_prefers_the_model_loaded_with_a_free_slot() -> None:
    assert chosen(candidate(0, busy=0), candidate(1, resident=True, busy=3)) == 1
    # Every slot taken there: a load under way elsewhere, then room elsewhere, come first.
    assert chosen(candidate(0, resident=True, free_slots=0, room=0), candidate(1, loading=True, room=0)) == 1
    assert chosen(candidate(0, resident=True, free_slots=0, room=0), candidate(1, room=2)) == 1
    # No room anywhere: wait for a slot where it is loaded, rather than unload an idle model for a second copy.
    assert chosen(candidate(0, room=0, idle=1), candidate(1, resident=True, free_slots=0, room=0)) == 1
    assert chosen(candidate(0, room=0, idle=0), candidate(1, room=0, idle=1)) == 1


def test_routing_breaks_ties_by_the_least_busy_then_the_most_room_then_the_first() -> None:
    assert chosen(candidate(0, busy=2), candidate(1, busy=1)) == 1
    assert chosen(candidate(0, room=1), candidate(1, room=2)) == 1
    assert chosen(candidate(0), candidate(1)) == 0


def test_routing_never_chooses_an_endpoint_that_is_down_or_refused_and_avoids_one_that_failed() -> None:
    assert chosen(candidate(0, resident=True, usable=False), candidate(1)) == 1
    assert chosen(candidate(0, usable=False), candidate(1, usable=False)) is None
    assert chosen(candidate(0, resident=True, avoided=True), candidate(1, room=0, idle=1)) == 1
    assert chosen(candidate(0, avoided=True), candidate(1, avoided=True, busy=1)) == 0  # both failed: as ever


@pytest.fixture
def host() -> Iterator[dict[str, Any]]:
    """Two Ollama endpoints in real shared memory, each keeping one model (MODEL_CACHE_SIZE=1)."""
    state = SharedState(4)
    state.header.workers_wanted = 4
    settings = load(OLLAMA_BASE_URL=f"{A},{B}", CIRCUIT_BREAKER_THRESHOLD="2", CIRCUIT_BREAKER_RESET_TIMEOUT="60000")
    providers = ollama_providers(settings)
    breakers = Breakers(state.breakers, state.lock, settings)
    reach = Reachability(state.providers, state.lock)
    board = LoadBoard(state.loads)
    board.serve("ollama")
    router = Router(providers, breakers, reach, board, state)
    one, two = (router.index(p) for p in providers)
    for endpoint in (one, two):
        state.loads.endpoints[endpoint].cache_size = 1
    yield {
        "state": state,
        "providers": providers,
        "breakers": breakers,
        "reach": reach,
        "board": board,
        "router": router,
        "one": one,
        "two": two,
        "alpha": state.model_index("alpha", add=True),
        "beta": state.model_index("beta", add=True),
    }
    for p in providers:
        p.close()


def bind(state: SharedState, slot: int, endpoint: int, model: int, call: Call = Call.CALLING) -> None:
    """A live worker in ``slot`` bound for ``model`` on ``endpoint``."""
    s = state.slots[slot]
    s.pid, s.provider, s.model, s.call = os.getpid(), endpoint, model, call


def test_jobs_go_where_their_model_is_loaded_and_a_new_model_where_there_is_room(host: dict[str, Any]) -> None:
    router, board, (first, second) = host["router"], host["board"], host["providers"]
    assert router.route("alpha") is first  # nothing loaded anywhere: the first
    board.set_resident(host["one"], host["alpha"], True)
    assert router.route("alpha") is first
    assert router.route("beta") is second  # room there; the first would have to unload alpha
    board.set_resident(host["two"], host["beta"], True)
    assert router.route("beta") is second and router.route("alpha:latest") is first


def test_the_jobs_right_behind_a_first_one_follow_it_instead_of_loading_the_model_twice(
    host: dict[str, Any],
) -> None:
    state, router, (first, second) = host["state"], host["router"], host["providers"]
    state.loads.endpoints[host["one"]].cache_size = state.loads.endpoints[host["two"]].cache_size = 3
    bind(state, 0, host["two"], host["alpha"], Call.ROUTED)  # bound for the second, its load not begun
    assert router.route("alpha") is second  # the second is busier, but alpha is on its way there
    assert router.route("beta") is first  # the least busy for another model


def test_a_down_endpoint_or_an_open_breaker_sends_the_call_to_another(host: dict[str, Any]) -> None:
    router, board, reach, breakers = host["router"], host["board"], host["reach"], host["breakers"]
    first, second = host["providers"]
    board.set_resident(host["one"], host["alpha"], True)
    board.set_resident(host["one"], host["beta"], True)
    for _ in range(2):
        breakers.record(breakers.admit("ollama@1", "alpha", 5), FAIL)
    assert breakers.refused("alpha", "ollama@1") and not breakers.refused("alpha", "ollama@2")
    assert router.route("alpha") is second  # its breaker there is open: loaded or not, not there
    assert router.route("beta") is first  # another model's breaker on the first is closed
    reach.mark_down("ollama@1", "connection refused")
    assert router.route("beta") is second
    assert router.usable(second, "alpha") and not router.usable(first, "beta")


def test_a_retry_after_an_endpoints_failure_goes_to_another(host: dict[str, Any]) -> None:
    router, board, (first, second) = host["router"], host["board"], host["providers"]
    board.set_resident(host["one"], host["alpha"], True)
    assert router.route("alpha", avoid={"ollama@1"}) is second
    assert router.route("alpha", avoid={"ollama@1", "ollama@2"}) is first


def test_servers_whose_models_no_manager_keeps_take_calls_by_their_free_places() -> None:
    # Two llama.cpp servers of one slot each (OPENAI_MAX_CONCURRENT=1), behind OPENAI_BASE_URL.
    state = SharedState(4)
    settings = load(OPENAI_BASE_URL=f"{A}/v1,{B}/v1", OPENAI_MAX_CONCURRENT="1")
    first, second = openai_providers(settings)
    router = Router([first, second], Breakers(state.breakers, state.lock, settings), None, None, state)
    assert router.route("openai:m") is first
    bind(state, 0, router.index(first), state.model_index("openai:m", add=True))
    assert router.route("openai:m") is second and router.route("openai:other") is second
    bind(state, 1, router.index(second), state.model_index("openai:m", add=True))
    assert router.route("openai:m") is first  # both full: the first, where the call waits for its place


def test_a_provider_with_one_endpoint_is_routed_to_without_reading_anything() -> None:
    providers = ollama_providers(load(OLLAMA_BASE_URL=A))
    state = SharedState(1)
    router = Router(providers, Breakers(state.breakers, state.lock, load()))
    assert router.route("alpha") is providers[0]
    assert router.endpoints_for("alpha") == providers


# ---- breakers and pauses, per endpoint -------------------------------------------------------------------


def test_one_endpoints_failures_never_open_anothers_breaker(host: dict[str, Any]) -> None:
    breakers = host["breakers"]
    for _ in range(2):
        breakers.record(breakers.admit("ollama@1", "alpha", 5), FAIL)
        breakers.record(breakers.admit("ollama@2", "alpha", 5), None)
    states = {row["key"]: row["state"] for row in breakers.rows()}
    assert states == {"ollama@1:alpha": "open", "ollama@2:alpha": "closed"}
    event = breaker_record(Transition("ollama@1:alpha", "opened", "2 failures"), "h:1")
    assert (event.data["provider"], event.data["endpoint"], event.data["model"]) == ("ollama", "ollama@1", "alpha")
    lone = breaker_record(Transition("ollama:alpha", "opened", "2 failures"), "h:1")
    assert lone.data["provider"] == "ollama" and "endpoint" not in lone.data  # one server: as it always was


def test_the_host_pauses_only_when_every_endpoint_of_its_models_is_down_or_refused(host: dict[str, Any]) -> None:
    reach, breakers, router, providers = host["reach"], host["breakers"], host["router"], host["providers"]

    def verdict(models: list[str]) -> Any:
        return pause_reason(models, providers, router.endpoints_for, reach, breakers)

    reach.mark_down("ollama@1", "connection refused")
    assert verdict([]).pause == Pause.NONE and verdict(["alpha"]).pause == Pause.NONE  # the second serves
    for _ in range(2):
        breakers.record(breakers.admit("ollama@2", "alpha", 5), FAIL)
    paused = verdict(["alpha"])
    assert paused.pause == Pause.BREAKERS_OPEN and paused.down == ("ollama@1",) and "ollama@2:alpha" in paused.why
    assert verdict(["alpha", "beta"]).pause == Pause.NONE  # beta can still go to the second
    reach.mark_down("ollama@2", "connection refused")
    down = verdict([])
    assert down.pause == Pause.PROVIDER_DOWN and down.down == ("ollama@1", "ollama@2")


# ---- what the host holds, for other hosts (models/fleet.py) ------------------------------------------------


def test_resident_labels_sums_free_slots_over_the_endpoints_that_answer(host: dict[str, Any]) -> None:
    state, board, one, two, alpha = host["state"], host["board"], host["one"], host["two"], host["alpha"]
    assert resident_labels(state) == {}
    for endpoint, slots in ((one, 2), (two, 1)):
        board.set_resident(endpoint, alpha, True)
        board.row(endpoint, alpha).slots = slots
    bind(state, 0, one, alpha)
    assert resident_labels(state) == {"alpha": 2}  # one of two free on the first, one on the second
    bind(state, 1, two, alpha, Call.WAITING)
    assert resident_labels(state) == {"alpha": 1}
    host["reach"].mark_down("ollama@1", "connection refused")
    assert resident_labels(state) == {"alpha": 0}  # loaded on the second, every slot taken


def test_a_model_can_be_loaded_without_evicting_a_busy_one_while_an_endpoint_has_room_or_an_idle_model(
    host: dict[str, Any],
) -> None:
    state, board, one, two = host["state"], host["board"], host["one"], host["two"]
    alpha, beta = host["alpha"], host["beta"]
    assert can_load_without_evicting_busy(state, "gamma")  # nothing loaded: room
    board.set_resident(one, alpha, True)
    board.set_resident(two, beta, True)
    bind(state, 0, one, alpha)
    bind(state, 1, two, beta)
    assert not can_load_without_evicting_busy(state, "gamma")  # each endpoint's one place holds a busy model
    assert can_load_without_evicting_busy(state, "alpha")  # loaded already
    assert can_load_without_evicting_busy(state, "gamma", cache_size=2)  # with room for two
    state.slots[1].call = Call.NONE
    assert can_load_without_evicting_busy(state, "gamma")  # beta is idle: the manager unloads it for room


# ---- the model manager's share of each endpoint -----------------------------------------------------------------


def test_preloads_are_spread_to_where_they_are_loaded_else_to_the_endpoint_holding_fewest() -> None:
    assert spread(["a", "b", "c"], [set(), set()]) == [["a", "c"], ["b"]]
    assert spread(["a", "b"], [{"x"}, {"b"}]) == [["a"], ["b"]]
    assert spread(["a", "b"], [None, set()]) == [[], ["a", "b"]]  # the one that answered takes them
    assert spread(["a"], [None, None]) == [["a"], []]


def test_each_endpoint_gets_its_share_of_the_memory_and_one_endpoint_all_of_it() -> None:
    gpu = Memory(used=70.0, total=100.0, source="gpu")
    assert endpoint_share(gpu, own=30.0, everyone=50.0, endpoints=1) == gpu
    # Two servers: half the memory each, its own models' 30 and half of the 20 used by others.
    assert endpoint_share(gpu, own=30.0, everyone=50.0, endpoints=2) == Memory(40.0, 50.0, "gpu")


# ---- health and metrics per endpoint ------------------------------------------------------------------------


def test_the_provider_is_healthy_while_any_endpoint_answers_and_says_which_are_down() -> None:
    up = Health(ok=True, message="Ollama is running", url=A, version="0.33.0")
    down = Health(ok=False, message="Ollama is not reachable", url=B, error_details="connection refused")
    assert whole([up]) is up
    either = whole([down, up])
    assert either.ok and either.version == "0.33.0" and either.message == "1 of 2 endpoints answer"
    assert either.error_details == f"{B}: connection refused"
    assert not whole([down, down]).ok


def samples(state: SharedState, **env: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    collector = ShmCollector(load(**env), state)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in collector.collect() for s in family.samples
    }


def test_metrics_carry_an_endpoint_label_only_where_a_provider_has_several(host: dict[str, Any]) -> None:
    state, breakers = host["state"], host["breakers"]
    EndpointTable(state.providers, state.lock).register("openai", "openai", "http://x/v1")
    breakers.record(breakers.admit("ollama@2", "alpha", 5), None)
    breakers.record(breakers.admit("openai", "gpt", 5), None)
    host["reach"].mark_down("ollama@1", "connection refused")
    host["board"].row(host["one"], host["alpha"]).loads = 2
    got = samples(state)
    assert got[("llm_worker_breaker_state", (("endpoint", B), ("model", "alpha"), ("provider", "ollama")))] == 0
    assert ("llm_worker_breaker_state", (("model", "gpt"), ("provider", "openai"))) in got
    assert got[("llm_worker_provider_reachable", (("endpoint", A), ("provider", "ollama")))] == 0
    assert got[("llm_worker_provider_reachable", (("endpoint", B), ("provider", "ollama")))] == 1
    assert got[("llm_worker_model_loads_total", (("endpoint", A), ("model", "alpha")))] == 2
    assert got[("llm_worker_endpoint_calls_in_flight", (("endpoint", B), ("provider", "ollama")))] == 0


def test_with_one_server_the_series_are_as_they_always_were() -> None:
    state = SharedState(2)
    EndpointTable(state.providers, state.lock).register("ollama", "ollama", A)
    LoadBoard(state.loads).serve("ollama")
    index = state.model_index("alpha", add=True)
    breakers = Breakers(state.breakers, state.lock, load())
    breakers.record(breakers.admit("ollama", "alpha", 5), None)
    got = samples(state)
    assert ("llm_worker_breaker_state", (("model", "alpha"), ("provider", "ollama"))) in got
    assert ("llm_worker_provider_up", (("provider", "ollama"),)) in got
    assert ("llm_worker_model_loads_total", (("model", "alpha"),)) in got and index > 0
    assert ("llm_worker_models_loaded", ()) in got
