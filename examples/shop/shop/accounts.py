"""accounts: customer accounts, event sourced (AccountOpened, MoneyDeposited, MoneyWithdrawn; snapshots).

An account's state is the fold of its events, kept in the event store; ``GET /accounts/{id}`` rebuilds it (from
the latest snapshot and the events after it) and ``GET /accounts/{id}/events`` shows the whole history. The list
of balances is a read model (CQRS): the projection ``account_balances`` keeps a table of them from the events.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, Field

from meshkit import Service, Transaction
from meshkit.errors import ConfigurationError, WrongExpectedVersion
from meshkit.eventsourcing import Aggregate, Event, RecordedEvent
from meshkit.projections import Projection

service = Service("accounts", version="1.0.0")
events = service.events  # declared: the service's database holds the event store


class AccountError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Account(Aggregate):
    stream_prefix = "account"  # streams account-<id>

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.owner = ""
        self.balance = 0
        self.opened = False

    # decisions: check the state, then record what happened
    def open(self, owner: str, initial: int) -> None:
        if self.opened:
            raise AccountError(409, f"account {self.id} is already open")
        self.record("AccountOpened", {"owner": owner, "initial": initial})

    def deposit(self, amount: int) -> None:
        self._must_be_open()
        self.record("MoneyDeposited", {"amount": amount})

    def withdraw(self, amount: int) -> None:
        self._must_be_open()
        if amount > self.balance:
            raise AccountError(409, f"insufficient funds: {amount} asked, {self.balance} in account {self.id}")
        self.record("MoneyWithdrawn", {"amount": amount})

    def _must_be_open(self) -> None:
        if not self.opened:
            raise AccountError(404, f"no account {self.id}")

    # state changes: no decisions, never fail
    def apply(self, event: Event) -> None:
        if event.type == "AccountOpened":
            self.opened, self.owner, self.balance = True, event.data["owner"], event.data["initial"]
        elif event.type == "MoneyDeposited":
            self.balance += event.data["amount"]
        elif event.type == "MoneyWithdrawn":
            self.balance -= event.data["amount"]


def checked(account_id: str) -> str:
    """A path's account id, or 404 when no account could have it (an id is what a stream name can hold)."""
    try:
        Account.stream_name(account_id)
    except ConfigurationError:
        raise HTTPException(404, f"no account {account_id!r}") from None
    return account_id


async def change(account_id: str, decide: Any) -> Account:
    """Load, decide, save; when another request saved the account first, decide again on its new state."""
    accounts = events.repository(Account, snapshot_every=20)
    checked(account_id)
    for _ in range(5):
        account = await accounts.load(account_id)
        try:
            decide(account)
        except AccountError as exc:
            raise HTTPException(exc.status, exc.detail) from None
        try:
            await accounts.save(account)
        except WrongExpectedVersion:
            continue
        return account
    raise HTTPException(409, f"account {account_id} is busy; try again")


def shown(account: Account) -> dict[str, object]:
    return {"id": account.id, "owner": account.owner, "balance": account.balance, "version": account.version}


class Opening(BaseModel):
    owner: str
    initial: int = Field(ge=0)


class Amount(BaseModel):
    amount: int = Field(gt=0)


@service.http.post("/accounts", status_code=201)
async def open_account(body: Opening) -> dict[str, object]:
    account_id = uuid.uuid4().hex[:12]
    return shown(await change(account_id, lambda a: a.open(body.owner, body.initial)))


@service.http.post("/accounts/{account_id}/deposits")
async def deposit(account_id: str, body: Amount) -> dict[str, object]:
    return shown(await change(account_id, lambda a: a.deposit(body.amount)))


@service.http.post("/accounts/{account_id}/withdrawals")
async def withdraw(account_id: str, body: Amount) -> dict[str, object]:
    return shown(await change(account_id, lambda a: a.withdraw(body.amount)))


@service.http.get("/accounts/{account_id}")
async def get_account(account_id: str) -> dict[str, object]:
    account = await events.repository(Account, snapshot_every=20).load(checked(account_id))
    if not account.opened:
        raise HTTPException(404, f"no account {account_id}")
    return shown(account)


@service.http.get("/accounts/{account_id}/events")
async def history(account_id: str) -> list[dict[str, Any]]:
    return [e.to_dict() for e in await events.load(Account.stream_name(checked(account_id)))]


# -- the read model (CQRS): every account's balance, one row each, kept from the events -----------------------------


async def balances(tx: Transaction, event: RecordedEvent) -> None:
    account_id = event.stream.removeprefix("account-")
    if event.type == "AccountOpened":
        await tx.execute(
            "INSERT INTO account_balances (id, owner, balance) VALUES (?, ?, ?)",
            account_id,
            event.data["owner"],
            event.data["initial"],
        )
    else:
        sign = 1 if event.type == "MoneyDeposited" else -1
        await tx.execute(
            "UPDATE account_balances SET balance = balance + ? WHERE id = ?", sign * event.data["amount"], account_id
        )


_BALANCES = "CREATE TABLE IF NOT EXISTS account_balances (id TEXT PRIMARY KEY, owner TEXT, balance BIGINT);"
service.projection(
    Projection(
        "account_balances",
        balances,
        schema={"sqlite": _BALANCES, "postgresql": _BALANCES},
        types=("AccountOpened", "MoneyDeposited", "MoneyWithdrawn"),
    )
)


@service.http.get("/balances")
async def all_balances() -> list[dict[str, object]]:
    """The read model: fast to query, a moment behind the events (see the dashboard's Sagas page for its lag)."""
    rows = await service.database.fetch("SELECT id, owner, balance FROM account_balances ORDER BY owner, id")
    return [{"id": r[0], "owner": r[1], "balance": r[2]} for r in rows]
