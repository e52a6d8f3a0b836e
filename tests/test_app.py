"""App declarations: mistakes refused at declaration, patterns, filters, retry policy."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from nerve.app import App, RetryPolicy, Subscription, matches_pattern
from nerve.errors import DefinitionError, EmitError
from nerve.event import Event


class OrderCreated(BaseModel):
    order_id: str
    customer: str
    total: Decimal = Decimal("0")
    at: datetime | None = None


class OrderShipped(BaseModel):
    order_id: str


class PaymentDone(BaseModel):
    order_id: str
    amount: int


def shop() -> App:
    app = App("shop")
    app.event("order.created", key="customer")(OrderCreated)
    app.event("order.shipped")(OrderShipped)
    app.event("payment.done", key=lambda p: f"pay-{p.order_id}")(PaymentDone)
    return app


async def noop(event: Any, ctx: Any) -> None:
    return None


def declare(app: App, **kwargs: Any) -> None:
    consumes = kwargs.pop("consumes", "order.created")
    app.function(consumes, **kwargs)(noop)


# ---------------------------------------------------------------------------------------
# Definition mistakes fail at declaration, naming the mistake


def test_duplicate_function_name() -> None:
    app = shop()
    declare(app)
    with pytest.raises(DefinitionError, match=r"'noop' is declared twice"):
        declare(app, consumes="order.shipped")
    declare(app, name="noop2")
    assert set(app.functions) == {"noop", "noop2"}


def test_duplicate_event_type() -> None:
    app = shop()

    class Other(BaseModel):
        x: int

    with pytest.raises(DefinitionError, match=r"event type 'order.created' is declared twice"):
        app.event("order.created")(Other)
    assert app.events["order.created"].model is OrderCreated


def test_same_model_bound_twice() -> None:
    app = shop()
    with pytest.raises(DefinitionError, match=r"OrderCreated is already bound to 'order.created'"):
        app.event("order.made")(OrderCreated)


def test_subscription_to_undeclared_type_names_it_and_suggests() -> None:
    app = shop()
    with pytest.raises(DefinitionError) as info:
        declare(app, consumes="order.creatd")
    message = str(info.value)
    assert "'order.creatd'" in message
    assert "not declared" in message
    assert "did you mean 'order.created'?" in message
    assert "'noop'" in message
    assert app.functions == {}


def test_subscription_to_undeclared_type_without_close_match() -> None:
    app = shop()
    with pytest.raises(DefinitionError) as info:
        declare(app, consumes="zzz.qqq")
    assert "'zzz.qqq'" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_subscription_to_undeclared_model() -> None:
    app = shop()

    class Stray(BaseModel):
        x: int

    with pytest.raises(DefinitionError, match=r"Stray.*not declared with @app.event"):
        declare(app, consumes=Stray)


def test_emits_an_undeclared_type() -> None:
    app = shop()
    with pytest.raises(DefinitionError) as info:
        declare(app, emits=["order.shiped"])
    message = str(info.value)
    assert "emits" in message and "'order.shiped'" in message
    assert "did you mean 'order.shipped'?" in message


@pytest.mark.parametrize("pattern", ["order.**", "order.*x", "*order", "order.*.>>", "order*.x"])
def test_bad_pattern_syntax(pattern: str) -> None:
    app = shop()
    with pytest.raises(DefinitionError) as info:
        declare(app, consumes=pattern)
    assert repr(pattern) in str(info.value)
    assert "not valid" in str(info.value)


@pytest.mark.parametrize("pattern", ["order.>.created", "order.>x", "a>b"])
def test_pattern_with_misplaced_rest_wildcard_is_reported_as_invalid(pattern: str) -> None:
    app = shop()
    with pytest.raises(DefinitionError) as info:
        declare(app, consumes=pattern)
    assert "not valid" in str(info.value)


def test_wildcard_that_matches_nothing() -> None:
    app = shop()
    with pytest.raises(DefinitionError, match=r"pattern 'invoice\.\*' matches no declared"):
        declare(app, consumes="invoice.*")
    with pytest.raises(DefinitionError, match=r"matches no declared"):
        declare(app, consumes="order.created.*")
    declare(app, consumes=["order.*", "payment.>"])
    assert app.functions["noop"].subscription.patterns == ("order.*", "payment.>")


def test_non_async_handler() -> None:
    app = shop()

    def handler(event: Any, ctx: Any) -> None:
        return None

    with pytest.raises(DefinitionError, match=r"must be 'async def handler\(event, ctx\)'"):
        app.function("order.created")(handler)


def test_non_basemodel_event_class() -> None:
    app = App("a")

    class NotAModel:
        x: int = 0

    with pytest.raises(DefinitionError, match=r"must decorate a pydantic BaseModel"):
        app.event("thing.happened")(NotAModel)  # type: ignore[type-var]
    assert app.events == {}


def test_key_field_not_on_model() -> None:
    app = App("a")

    class Thing(BaseModel):
        thing_id: str

    with pytest.raises(DefinitionError) as info:
        app.event("thing.happened", key="id")(Thing)
    assert "key='id' is not a field of Thing" in str(info.value)
    assert "thing_id" in str(info.value)


@pytest.mark.parametrize("name", ["", "order created", ".order", "order.", "order..x", "a/b"])
def test_bad_event_type_name(name: str) -> None:
    with pytest.raises(DefinitionError, match="is not valid"):
        App("a").event(name)


@pytest.mark.parametrize("name", ["1st", "has space", "a" * 101, "dot.ted"])
def test_bad_function_name(name: str) -> None:
    with pytest.raises(DefinitionError, match="names are letters"):
        declare(shop(), name=name)


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_bad_timeout(timeout: float) -> None:
    with pytest.raises(DefinitionError, match=r"timeout must be > 0"):
        declare(shop(), timeout=timeout)


def test_timeout_none_is_allowed() -> None:
    app = shop()
    declare(app, timeout=None)
    assert app.functions["noop"].timeout is None


@pytest.mark.parametrize("concurrency", [0, -3])
def test_bad_concurrency(concurrency: int) -> None:
    with pytest.raises(DefinitionError, match=r"concurrency must be >= 1"):
        declare(shop(), concurrency=concurrency)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"max_attempts": -2}, "max_attempts must be >= 1"),
        ({"base": -0.1}, "must be >= 0"),
        ({"cap": -1}, "must be >= 0"),
    ],
)
def test_bad_retry_policy(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DefinitionError, match=message):
        RetryPolicy(**kwargs)


def test_retry_must_be_a_policy() -> None:
    with pytest.raises(DefinitionError, match="RetryPolicy"):
        declare(shop(), retry=3)


def test_consumes_nothing() -> None:
    with pytest.raises(DefinitionError, match="consumes nothing"):
        declare(shop(), consumes=[])


def test_function_record() -> None:
    app = shop()

    @app.function(
        [OrderCreated, "order.shipped"],
        emits=["payment.done", OrderShipped],
        where={"subject": "eu-*", "tenant": "acme"},
        retry=RetryPolicy(max_attempts=2),
        timeout=5,
        concurrency=4,
        ordered=False,
    )
    async def bill(event: Any, ctx: Any) -> None:
        """Bill the customer."""

    fn = app.functions["bill"]
    assert fn.handler is bill
    assert fn.subscription == Subscription(
        "bill",
        ("order.created", "order.shipped"),
        (("subject", "eu-*"), ("tenant", "acme")),
        ordered=False,
    )
    assert fn.emits == frozenset({"payment.done", "order.shipped"})
    assert fn.retry.max_attempts == 2
    assert (fn.timeout, fn.concurrency) == (5, 4)
    assert fn.description == "Bill the customer."
    assert app.subscriptions() == [fn.subscription]
    fn.check_emit("payment.done")
    with pytest.raises(EmitError, match=r"emitted 'order.created'"):
        fn.check_emit("order.created")


def test_function_defaults() -> None:
    app = shop()
    declare(app)
    fn = app.functions["noop"]
    assert fn.retry == RetryPolicy()
    assert fn.timeout == 30.0 and fn.concurrency == 16 and fn.key is None
    assert fn.subscription.ordered is True
    assert fn.emits == frozenset()


# ---------------------------------------------------------------------------------------
# Patterns and subscriptions


@pytest.mark.parametrize(
    ("pattern", "type_name", "expected"),
    [
        ("order.created", "order.created", True),
        ("order.created", "order.created.v2", False),
        ("order.created", "order", False),
        ("order.created", "order.createdx", False),
        ("order.*", "order.created", True),
        ("order.*", "order.line.added", False),
        ("order.*", "order", False),
        ("order.*", "orders.created", False),
        ("*.created", "order.created", True),
        ("*.created", "order.line.created", False),
        ("order.*.added", "order.line.added", True),
        ("order.*.added", "order.line.removed", False),
        ("*", "order", True),
        ("*", "order.created", False),
        ("*.*", "order.created", True),
        ("order.>", "order.created", True),
        ("order.>", "order.line.added", True),
        ("order.>", "order", False),
        ("order.>", "orders.created", False),
        ("order.*.>", "order.line.added", True),
        ("order.*.>", "order.line", False),
        (">", "order", True),
        (">", "order.line.added", True),
        ("a_b-c.*", "a_b-c.d", True),
        ("a_b-c.*", "aXb-c.d", False),
    ],
)
def test_matches_pattern(pattern: str, type_name: str, expected: bool) -> None:
    assert matches_pattern(pattern, type_name) is expected


def event(**changes: Any) -> Event:
    fields: dict[str, Any] = {"type": "order.created", "source": "/shop"}
    fields.update(changes)
    return Event(**fields)


def test_subscription_patterns() -> None:
    sub = Subscription("g", ("order.created", "payment.*"))
    assert sub.matches(event())
    assert sub.matches(event(type="payment.done"))
    assert not sub.matches(event(type="order.shipped"))
    assert not sub.matches(event(type="payment.done.late"))


def test_subscription_exact_filter() -> None:
    sub = Subscription("g", ("order.*",), (("tenant", "acme"),))
    assert sub.matches(event(extensions={"tenant": "acme"}))
    assert not sub.matches(event(extensions={"tenant": "acme2"}))
    assert not sub.matches(event(extensions={"tenant": "acm"}))
    assert not sub.matches(event())  # missing attribute
    assert not sub.matches(event(type="payment.done", extensions={"tenant": "acme"}))


def test_subscription_prefix_filter() -> None:
    sub = Subscription("g", ("order.*",), (("subject", "eu-*"),))
    assert sub.matches(event(subject="eu-west"))
    assert sub.matches(event(subject="eu-"))
    assert not sub.matches(event(subject="us-east"))
    assert not sub.matches(event(subject="xeu-west"))
    assert not sub.matches(event())  # no subject


def test_subscription_filters_on_core_and_non_string_attributes() -> None:
    sub = Subscription("g", ("order.*",), (("priority", "5"), ("source", "/shop"), ("vip", "True")))
    assert sub.matches(event(extensions={"priority": 5, "vip": True}))
    assert not sub.matches(event(extensions={"priority": 5, "vip": False}))
    assert not sub.matches(event(source="/other", extensions={"priority": 5, "vip": True}))
    assert not sub.matches(event(extensions={"vip": True}))


def test_subscription_json_round_trip() -> None:
    sub = Subscription("g", ("order.*", "payment.>"), (("subject", "eu-*"),), ordered=False)
    assert Subscription.from_json(sub.to_json()) == sub


# ---------------------------------------------------------------------------------------
# RetryPolicy


def test_retry_delay_without_jitter_is_exponential_and_capped() -> None:
    policy = RetryPolicy(base=0.1, cap=1.0, jitter=False)
    delays = [policy.delay(n) for n in range(1, 8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert policy.delay(0) == pytest.approx(0.1)
    assert RetryPolicy(base=0, cap=5, jitter=False).delay(3) == 0


def test_retry_delay_with_jitter_stays_within_the_upper_half() -> None:
    random.seed(1234)
    policy = RetryPolicy(base=0.2, cap=3.0, jitter=True)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6), (5, 3.0), (9, 3.0)]:
        draws = [policy.delay(attempt) for _ in range(2_000)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws), attempt
        # spread over the whole half, not stuck at one end
        assert min(draws) < ceiling * 0.55
        assert max(draws) > ceiling * 0.95
        assert len(set(draws)) > 1_900


def test_retry_delay_grows_on_average() -> None:
    random.seed(99)
    policy = RetryPolicy(base=0.1, cap=100.0)
    means = [sum(policy.delay(n) for _ in range(500)) / 500 for n in range(1, 7)]
    assert all(b > a * 1.6 for a, b in itertools.pairwise(means))


def test_retry_delay_for_huge_attempt_numbers_is_the_cap() -> None:
    assert RetryPolicy(base=0.1, cap=5.0, jitter=False).delay(5_000) == 5.0


# ---------------------------------------------------------------------------------------
# make_event


def test_make_event_from_a_model_sets_the_declared_key() -> None:
    app = shop()
    when = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    e = app.make_event(
        OrderCreated(order_id="o1", customer="c9", total=Decimal("12.50"), at=when),
        subject="o1",
    )
    assert e.type == "order.created"
    assert e.source == "/shop"
    assert e.subject == "o1"
    assert e.partitionkey == "c9"
    assert e.data == {
        "order_id": "o1",
        "customer": "c9",
        "total": "12.50",
        "at": "2024-01-02T03:04:05Z",
    }
    assert e.datacontenttype == "application/json"


def test_make_event_key_function_and_explicit_key() -> None:
    app = shop()
    assert app.make_event(PaymentDone(order_id="o1", amount=5)).partitionkey == "pay-o1"
    explicit = app.make_event(PaymentDone(order_id="o1", amount=5), key="k-explicit")
    assert explicit.partitionkey == "k-explicit"
    created = app.make_event(OrderCreated(order_id="o1", customer="c9"), key="other")
    assert created.partitionkey == "other"
    no_key = app.make_event(OrderShipped(order_id="o1"))
    assert no_key.partitionkey is None and "partitionkey" not in no_key.extensions


def test_make_event_validates_mappings() -> None:
    app = shop()
    e = app.make_event({"order_id": "o2", "customer": "c1"}, type="order.created")
    assert e.data["order_id"] == "o2" and e.partitionkey == "c1"
    with pytest.raises(ValidationError) as info:
        app.make_event({"order_id": "o2"}, type="order.created")
    assert "customer" in str(info.value)
    with pytest.raises(ValidationError):
        app.make_event({"order_id": "o2", "amount": "lots"}, type="payment.done")
    with pytest.raises(DefinitionError, match="needs type="):
        app.make_event({"order_id": "o2", "customer": "c1"})
    with pytest.raises(DefinitionError, match=r"'order.creatd' is not declared"):
        app.make_event({"order_id": "o2", "customer": "c1"}, type="order.creatd")


def test_make_event_refuses_a_payload_of_the_wrong_model() -> None:
    app = shop()
    with pytest.raises(DefinitionError, match=r"OrderShipped, but 'order.created' carries"):
        app.make_event(OrderShipped(order_id="o1"), type="order.created")

    class Stray(BaseModel):
        x: int

    with pytest.raises(DefinitionError, match=r"not declared with @app\.event"):
        app.make_event(Stray(x=1))


def test_make_event_source_and_extensions() -> None:
    app = App("billing", source="urn:billing")
    app.event("invoice.sent")(OrderShipped)
    e = app.make_event(OrderShipped(order_id="1"), extensions={"tenant": "acme", "n": 2})
    assert e.source == "urn:billing"
    assert dict(e.extensions) == {"tenant": "acme", "n": 2}
    assert app.make_event(OrderShipped(order_id="1"), source="/x").source == "/x"
    assert App("plain").source == "/plain"


def test_event_type_lookup() -> None:
    app = shop()
    assert app.event_type("order.created") is app.event_type(OrderCreated)
    assert app.events["order.created"].key_of(OrderCreated(order_id="1", customer="c")) == "c"
    assert app.events["order.shipped"].key_of(OrderShipped(order_id="1")) is None


def test_store_tables_are_collected() -> None:
    app = App("a")
    app.store_tables("CREATE TABLE IF NOT EXISTS t (x)", "CREATE TABLE IF NOT EXISTS u (y)")
    assert app.store_schema == [
        "CREATE TABLE IF NOT EXISTS t (x)",
        "CREATE TABLE IF NOT EXISTS u (y)",
    ]
