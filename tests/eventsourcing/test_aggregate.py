"""Aggregates and the repository: decisions, optimistic concurrency, stream names, snapshots (and proof that a
load used one)."""

from __future__ import annotations

from typing import Any

import pytest

from meshkit._core.database import Database
from meshkit.errors import ConfigurationError, WrongExpectedVersion
from meshkit.eventsourcing import Aggregate, Event, EventStore, Repository
from tests.eventsourcing.accounts import Account, AccountClosed, InsufficientFunds

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(database: Database) -> EventStore:
    store = EventStore(database)
    await store.migrate()
    return store


async def test_decisions_record_events_that_the_repository_saves_and_loads(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = await accounts.load("42")
    assert (account.version, account.opened, account.stream) == (0, False, "account-42")
    with pytest.raises(AccountClosed):
        account.deposit(5)
    account.open("ada")
    account.deposit(100)
    account.withdraw(30)
    assert [e.type for e in account.pending] == ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn"]
    assert account.balance == 70
    assert await accounts.save(account) == 3
    assert (account.version, account.pending) == (3, [])
    assert await accounts.save(account) == 3  # nothing pending: nothing written
    assert await store.head() == 3

    again = await accounts.load("42")
    assert (again.version, again.owner, again.balance) == (3, "ada", 70)
    with pytest.raises(InsufficientFunds) as refused:
        again.withdraw(71)
    assert (refused.value.amount, refused.value.balance) == (71, 70)
    assert again.pending == []  # a refused decision records nothing
    assert [e.type for e in await store.load("account-42")] == ["AccountOpened", "MoneyDeposited", "MoneyWithdrawn"]


async def test_two_writers_of_one_aggregate_the_second_save_conflicts(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = Account("7")
    account.open("ada")
    account.deposit(50)
    await accounts.save(account)

    first, second = await accounts.load("7"), await accounts.load("7")
    first.withdraw(40)
    second.withdraw(40)  # would overdraw the account if both were saved
    await accounts.save(first)
    with pytest.raises(WrongExpectedVersion) as conflict:
        await accounts.save(second)
    assert (conflict.value.expected, conflict.value.actual) == (2, 3)
    assert len(second.pending) == 1  # still pending: reload and decide again
    retried = await accounts.load("7")
    with pytest.raises(InsufficientFunds):
        retried.withdraw(40)

    duplicate = Account("7")
    duplicate.open("eve")
    with pytest.raises(WrongExpectedVersion):  # a new aggregate expects version 0: the id is taken
        await accounts.save(duplicate)


async def test_repository_loads_from_the_latest_snapshot_and_the_later_events(store: EventStore) -> None:
    accounts = Repository(store, Account, snapshot_every=5)
    account = Account("1")
    account.open("ada")
    await accounts.save(account)
    for amount in range(1, 12):  # 11 deposits, one save each: 12 events
        account.deposit(amount)
        await accounts.save(account)
    snapshot = await store.load_snapshot("account-1")
    assert snapshot is not None
    assert snapshot.version == 10
    assert snapshot.state == {"owner": "ada", "opened": True, "balance": sum(range(1, 10))}

    Account.applied = 0
    loaded = await accounts.load("1")
    assert (loaded.version, loaded.balance) == (12, sum(range(1, 12)))
    assert Account.applied == 2  # events 11 and 12 only: the snapshot stood for the first ten

    # the state comes from the snapshot: one that lies shows through
    await store.save_snapshot("account-1", 11, {"owner": "ada", "opened": True, "balance": 1000})
    assert (await accounts.load("1")).balance == 1000 + 11

    # without snapshots every event is applied
    Account.applied = 0
    assert (await Repository(store, Account).load("1")).balance == sum(range(1, 12))
    assert Account.applied == 12


async def test_a_save_of_many_events_crossing_a_multiple_snapshots_once(store: EventStore) -> None:
    accounts = Repository(store, Account, snapshot_every=3)
    account = Account("2")
    account.open("ada")
    account.deposit(1)
    await accounts.save(account)
    assert await store.load_snapshot("account-2") is None
    for _ in range(5):
        account.deposit(1)
    await accounts.save(account)  # versions 3..7: crosses 3 and 6, one snapshot at 7
    snapshot = await store.load_snapshot("account-2")
    assert snapshot is not None
    assert (snapshot.version, snapshot.state["balance"]) == (7, 6)


class Wallet(Aggregate):
    """State that JSON cannot hold (a set), with its own snapshot shape."""

    snapshot_version = 2

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.coins: set[str] = set()

    def add(self, coin: str) -> None:
        self.record("CoinAdded", {"coin": coin})

    def apply(self, event: Event) -> None:
        self.coins.add(event.data["coin"])

    def snapshot(self) -> dict[str, Any]:
        return {"coins": sorted(self.coins)}

    def restore(self, state: dict[str, Any]) -> None:
        self.coins = set(state["coins"])


class Naive(Wallet):
    snapshot = Aggregate.snapshot  # the default: the set is not JSON-able
    restore = Aggregate.restore


async def test_custom_snapshot_shapes_and_versions(store: EventStore) -> None:
    wallets = Repository(store, Wallet, snapshot_every=2)
    wallet = Wallet("w")
    assert wallet.stream == "wallet-w"  # the default prefix: the class name in lower case
    wallet.add("a")
    wallet.add("b")
    await wallets.save(wallet)
    snapshot = await store.load_snapshot("wallet-w")
    assert snapshot is not None
    assert (snapshot.state, snapshot.schema_version) == ({"coins": ["a", "b"]}, 2)
    assert (await wallets.load("w")).coins == {"a", "b"}

    # a snapshot of another shape is ignored: the events are replayed instead
    await store.save_snapshot("wallet-w", 2, {"coins": ["forged"]}, schema_version=1)
    assert (await wallets.load("w")).coins == {"a", "b"}

    naive = Repository(store, Naive, snapshot_every=1)
    broken = Naive("n")
    broken.add("a")
    with pytest.raises(ConfigurationError, match="not JSON-able"):
        await naive.save(broken)
    assert await store.version("naive-n") == 0  # the bad snapshot failed the save before anything was appended


async def test_bad_aggregates_and_repositories_are_refused(store: EventStore) -> None:
    class Bad(Account):
        stream_prefix = "has-dash"

    class Forgetful(Aggregate):  # no apply: cannot be made
        pass

    class Other(Aggregate):
        def apply(self, event: Event) -> None:
            pass

    with pytest.raises(ConfigurationError, match="stream_prefix"):
        Repository(store, Bad)
    with pytest.raises(ConfigurationError, match="snapshot_every"):
        Repository(store, Account, snapshot_every=0)
    with pytest.raises(ConfigurationError, match="aggregate id"):
        Account("")
    with pytest.raises(ConfigurationError, match="bad stream name"):
        Account("has space").stream  # noqa: B018
    with pytest.raises(TypeError, match="abstract method"):
        Forgetful("x")  # type: ignore[abstract]
    with pytest.raises(ConfigurationError, match="saves Account"):
        await Repository(store, Account).save(Other("x"))  # type: ignore[arg-type]
    assert Account.stream_name("42") == "account-42"
