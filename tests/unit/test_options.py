"""Deployment and handle options: names, defaults, and clear errors at the call site."""

import pytest

import serve
from serve._options import DEFAULT, HandleOptions, validate_handle_options
from serve.config import AutoscalingConfig


def _handle_kwargs(**given: object) -> dict[str, object]:
    names = [
        "method_name",
        "multiplexed_model_id",
        "stream",
        "use_new_handle_api",
        "prefer_local_routing",
        "by_reference",
        "request_serialization",
        "response_serialization",
    ]
    return {name: given.get(name, DEFAULT.VALUE) for name in names}


class Model:
    def __call__(self) -> int:
        return 1


def test_defaults_match_ray() -> None:
    d = serve.deployment(Model)
    assert d.name == "Model"
    assert d.num_replicas == 1
    assert d.max_ongoing_requests == 5
    assert d.max_queued_requests == -1
    assert d.user_config is None
    config = d.config
    assert config.graceful_shutdown_wait_loop_s == 2.0
    assert config.graceful_shutdown_timeout_s == 20.0
    assert config.health_check_period_s == 10.0
    assert config.health_check_timeout_s == 30.0
    assert config.max_constructor_retry_count == 20


def test_decorator_forms() -> None:
    assert serve.deployment(Model).name == "Model"
    assert serve.deployment()(Model).name == "Model"
    assert serve.deployment(name="M", num_replicas=3)(Model).num_replicas == 3

    @serve.deployment
    def fn(x: int) -> int:
        return x

    assert fn.name == "fn"


@pytest.mark.parametrize(
    ("options", "error", "text"),
    [
        ({"num_replicas": -1}, ValueError, "num_replicas must be >= 0"),
        ({"num_replicas": "many"}, TypeError, "num_replicas must be an integer"),
        ({"max_ongoing_requests": 0}, ValueError, "max_ongoing_requests must be >= 1"),
        ({"max_ongoing_requests": 1.5}, TypeError, "max_ongoing_requests must be an integer"),
        ({"max_queued_requests": 0}, ValueError, "max_queued_requests must be >= 1 (or -1)"),
        ({"health_check_period_s": 0}, ValueError, "health_check_period_s must be > 0"),
        ({"health_check_timeout_s": -1}, ValueError, "health_check_timeout_s must be > 0"),
        ({"graceful_shutdown_timeout_s": -1}, ValueError, "must be >= 0"),
        ({"graceful_shutdown_wait_loop_s": "x"}, TypeError, "must be a number"),
        ({"user_config": {1: object()}}, TypeError, "user_config must be JSON-serializable"),
        ({"name": ""}, TypeError, "name must be a non-empty string"),
        ({"name": "a#b"}, ValueError, "must not contain '#'"),
        ({"ray_actor_options": {"num_cpu": 1}}, ValueError, "unknown key(s) ['num_cpu']"),
        ({"autoscaling_config": {"min_replica": 1}}, ValueError, "unknown field(s)"),
        (
            {"request_router_config": {"request_router_class": "my.routers:Sticky"}},
            ImportError,
            "request_router_class 'my.routers:Sticky': cannot import module 'my.routers'",
        ),
        (  # Ray's shorthand, checked the same way
            {"request_router_class": "collections:OrderedDict"},
            TypeError,
            "must be a subclass of serve.request_router.RequestRouter",
        ),
        (
            {"request_router_config": {"request_router_kwargs": {"f": object()}}},
            ValueError,
            "request_router_kwargs is not JSON-serializable",
        ),
        (
            {"request_router_config": {"request_routing_stats_period_s": 0}},
            ValueError,
            "request_routing_stats_period_s must be > 0",
        ),
        ({"rolling_update_percentage": 0}, ValueError, "must be > 0 and <= 1"),
        ({"rolling_update_percentage": 1.5}, ValueError, "must be > 0 and <= 1"),
        ({"max_surge_percent": -1}, ValueError, "must be >= 0 and <= 100"),
        ({"max_surge_percent": "10%"}, TypeError, "max_surge_percent must be a number"),
        (
            {"placement_group_bundle_label_selector": [{"zone": "a"}]},
            ValueError,
            "placement_group_bundle_label_selector needs placement_group_bundles",
        ),
        (
            {"autoscaling_config": {"policy": {"policy_function": "no_such_module:f"}}},
            ImportError,
            "policy_function 'no_such_module:f': cannot import module 'no_such_module'",
        ),
        (
            {"autoscaling_config": {"policy": {"policy_function": "math:pi", "x": 1}}},
            ValueError,
            "policy: unknown field(s) ['x']",
        ),
        (
            {"autoscaling_config": {"min_replicas": 3, "max_replicas": 2}},
            ValueError,
            "max_replicas (2) must be greater",
        ),
        (
            {"num_replicas": 2, "autoscaling_config": {"max_replicas": 2}},
            ValueError,
            "num_replicas is not allowed",
        ),
    ],
)
def test_bad_options_fail_at_decoration(options: dict[str, object], error: type, text: str) -> None:
    with pytest.raises(error) as info:
        serve.deployment(**options)(Model)
    assert text in str(info.value)
    # ... and the same through .options()
    with pytest.raises(error):
        serve.deployment(Model).options(**options)


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_concurrency'"):
        serve.deployment(max_concurrency=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        serve.deployment(Model).options(num_replica=2)


def test_options_returns_a_copy() -> None:
    base = serve.deployment(num_replicas=2)(Model)
    other = base.options(name="Other", max_ongoing_requests=10)
    assert (base.name, base.max_ongoing_requests) == ("Model", 5)
    assert (other.name, other.max_ongoing_requests, other.num_replicas) == ("Other", 10, 2)
    auto = base.options(autoscaling_config={"min_replicas": 1, "max_replicas": 4})
    assert auto.config.num_replicas is None
    assert auto.config.autoscaling_config == AutoscalingConfig(min_replicas=1, max_replicas=4)


def test_num_replicas_auto_uses_ray_defaults() -> None:
    d = serve.deployment(num_replicas="auto")(Model)
    auto = d.config.autoscaling_config
    assert auto is not None
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 100, 2.0)
    tuned = serve.deployment(num_replicas="auto", autoscaling_config={"max_replicas": 7})(Model)
    assert tuned.config.autoscaling_config is not None
    assert tuned.config.autoscaling_config.max_replicas == 7
    assert tuned.config.autoscaling_config.min_replicas == 1


def test_ray_only_options_are_accepted() -> None:
    d = serve.deployment(
        ray_actor_options={"num_cpus": 1},
        placement_group_bundles=[{"CPU": 1}],
        placement_group_strategy="PACK",
        version="v1",
        route_prefix="/x",
        request_router_config={
            "request_router_class": "ray.serve.request_router.PowerOfTwoChoicesRequestRouter",
            "initial_backoff_s": 0.05,
        },
        placement_group_bundle_label_selector=[{"ray.io/accelerator-type": "H100"}],
        rolling_update_percentage=0.5,
        max_surge_percent=25,
    )(Model)
    assert d.version == "v1"
    config = d.config
    assert config.request_router_config is not None
    assert config.request_router_config.is_default  # Ray's path names serve's default router
    assert config.request_router_config.initial_backoff_s == 0.05
    assert (config.rolling_update_percentage, config.max_surge_percent) == (0.5, 25.0)


def test_decorating_something_else_fails() -> None:
    with pytest.raises(TypeError, match="must decorate a class or a function"):
        serve.deployment(42)


def test_deployment_cannot_be_called() -> None:
    with pytest.raises(RuntimeError, match=r"Use `Model.bind\(...\)`"):
        serve.deployment(Model)()


def test_handle_options_defaults_and_copy() -> None:
    options = HandleOptions()
    assert (options.method_name, options.multiplexed_model_id, options.stream) == (
        "__call__",
        "",
        False,
    )
    assert (options.request_serialization, options.response_serialization) == (
        "cloudpickle",
        "cloudpickle",
    )
    changed = options.copy_and_update(method_name="m", stream=DEFAULT.VALUE)
    assert changed.method_name == "m"
    assert changed.stream is False
    assert options.method_name == "__call__"


def test_handle_options_accept_all_eight_fields() -> None:
    with pytest.warns(DeprecationWarning, match="use_new_handle_api"):
        changes = validate_handle_options(
            **_handle_kwargs(
                method_name="m",
                multiplexed_model_id="model-1",
                stream=True,
                use_new_handle_api=True,
                prefer_local_routing=True,
                by_reference=False,
                request_serialization="MSGPACK",
                response_serialization="orjson",
            )
        )
    assert changes == {
        "method_name": "m",
        "multiplexed_model_id": "model-1",
        "stream": True,
        "prefer_local_routing": True,
        "by_reference": False,
        "request_serialization": "msgpack",
        "response_serialization": "orjson",
    }


@pytest.mark.parametrize(
    ("given", "error", "text"),
    [
        ({"request_serialization": "yaml"}, ValueError, "Unsupported serialization method 'yaml'"),
        ({"response_serialization": "json"}, ValueError, "choose one of"),
        ({"stream": "yes"}, TypeError, "stream must be a bool"),
        ({"method_name": ""}, TypeError, "method_name must be a non-empty string"),
        ({"multiplexed_model_id": 3}, TypeError, "multiplexed_model_id must be a string"),
    ],
)
def test_bad_handle_options(given: dict[str, object], error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        validate_handle_options(**_handle_kwargs(**given))


def test_the_name_can_be_given_positionally_as_in_ray() -> None:
    @serve.deployment("Named")
    class Model:
        pass

    assert Model.name == "Named"
    with pytest.raises(TypeError, match="given twice"):
        serve.deployment("A", name="B")


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("api", "must start with a forward slash"),
        ("/api/", "may not end with a trailing '/'"),
        ("/{id}", "may not contain wildcards"),
    ],
)
def test_route_prefix_follows_rays_rules(prefix: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        serve.deployment(route_prefix=prefix)
    with pytest.raises(ValueError, match=message):
        serve.run(serve.deployment(lambda: None).bind(), route_prefix=prefix)


def test_valid_route_prefixes_are_accepted() -> None:
    for prefix in ("/", "/api", "/api/v1", None):
        serve.deployment(route_prefix=prefix)


@pytest.mark.parametrize(
    "legacy", ["target_num_ongoing_requests_per_replica", "target_num_ongoing_requests"]
)
def test_legacy_autoscaling_target_names_are_accepted(legacy: str) -> None:
    config = AutoscalingConfig.from_value({"max_replicas": 3, legacy: 7})
    assert config.target_ongoing_requests == 7


@pytest.mark.parametrize("field", ["pip", "conda", "uv", "container"])
def test_runtime_env_that_installs_packages_is_refused_not_ignored(field: str) -> None:
    with pytest.raises(ValueError, match="driver's Python environment"):
        serve.deployment(ray_actor_options={"runtime_env": {field: ["requests"]}})


def test_runtime_env_checks_what_it_honours() -> None:
    env = {"env_vars": {"A": "1"}, "working_dir": "/tmp", "py_modules": ["/tmp/mod"]}
    d = serve.deployment(Model, ray_actor_options={"runtime_env": env})
    assert d.config.ray_actor_options == {"runtime_env": env}
    with pytest.raises(TypeError, match="dict of strings to strings"):
        serve.deployment(ray_actor_options={"runtime_env": {"env_vars": {"A": 1}}})
    with pytest.raises(TypeError, match="remote URIs are not fetched"):
        serve.deployment(ray_actor_options={"runtime_env": {"working_dir": "s3://b/x.zip"}})
    with pytest.raises(ValueError, match="unknown or unsupported"):
        serve.deployment(ray_actor_options={"runtime_env": {"nsight": "default"}})


def test_placement_rules_as_in_ray() -> None:
    with pytest.raises(ValueError, match="all zero resources"):
        serve.deployment(placement_group_bundles=[{"CPU": 1}, {"CPU": 0}])
    with pytest.raises(ValueError, match="max_replicas_per_node is not allowed"):
        serve.deployment(placement_group_bundles=[{"CPU": 1}], max_replicas_per_node=2)
    serve.deployment(placement_group_bundles=[{"CPU": 1}])
    serve.deployment(max_replicas_per_node=2)


def test_a_class_that_cannot_be_serialized_fails_at_decoration() -> None:
    import threading

    class Holder:
        lock = threading.Lock()  # a class attribute replicas could never receive

        def __call__(self) -> int:
            return 1

    with pytest.raises(TypeError, match="cannot be serialized") as info:
        serve.deployment(Holder)
    assert "create them in __init__" in str(info.value)


def test_extension_configs_become_plain_data_for_config_files() -> None:
    import yaml

    from serve.config import AutoscalingConfig, RequestRouterConfig

    # A dict, as a config file gives it.
    auto = AutoscalingConfig(max_replicas=3, policy={"policy_function": "math:floor"})  # type: ignore[arg-type]
    router = RequestRouterConfig(request_router_kwargs={"k": 1})
    text = yaml.safe_dump({"autoscaling_config": auto.to_dict(), "router": router.to_dict()})
    data = yaml.safe_load(text)
    assert data["autoscaling_config"]["policy"] == {
        "policy_function": "math:floor",
        "policy_kwargs": {},
    }
    assert AutoscalingConfig.from_value(data["autoscaling_config"]) == auto
    assert RequestRouterConfig.from_value(data["router"]) == router
