"""The Account aggregate of the docs, shared by the event sourcing and projection tests."""

from __future__ import annotations

from typing import Any, ClassVar

from meshkit.eventsourcing import Aggregate, Event


class InsufficientFunds(Exception):
    def __init__(self, account: str, amount: int, balance: int) -> None:
        super().__init__(f"account {account} holds {balance}, cannot withdraw {amount}")
        self.amount = amount
        self.balance = balance


class AccountClosed(Exception):
    pass


class Account(Aggregate):
    stream_prefix = "account"
    applied: ClassVar[int] = 0  # how many events instances applied (to prove a snapshot was used)

    def __init__(self, id: str) -> None:
        super().__init__(id)
        self.owner = ""
        self.opened = False
        self.balance = 0

    def open(self, owner: str) -> None:
        if self.opened:
            raise AccountClosed(f"account {self.id} is open already")
        self.record("AccountOpened", {"owner": owner})

    def deposit(self, amount: int) -> None:
        if not self.opened:
            raise AccountClosed(f"account {self.id} is not open")
        self.record("MoneyDeposited", {"amount": amount})

    def withdraw(self, amount: int) -> None:
        if not self.opened:
            raise AccountClosed(f"account {self.id} is not open")
        if amount > self.balance:
            raise InsufficientFunds(self.id, amount, self.balance)
        self.record("MoneyWithdrawn", {"amount": amount})

    def apply(self, event: Event) -> None:
        type(self).applied += 1
        data: dict[str, Any] = event.data
        if event.type == "AccountOpened":
            self.owner, self.opened = data["owner"], True
        elif event.type == "MoneyDeposited":
            self.balance += data["amount"]
        elif event.type == "MoneyWithdrawn":
            self.balance -= data["amount"]
