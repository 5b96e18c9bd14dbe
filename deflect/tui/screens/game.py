"""The attacker game: the player buys models of a set, crafts one example a round and sends it to
clients they cannot see. The rules are `deflect.game`; this screen renders them and crafts the
examples (on the player's models, in a worker) so every outcome is what the real models answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static

from deflect.game import DEFLECTED, FOOLED, VOID, AttackerGame, GameRound, GameRules, SuccessTable, as_crafted
from deflect.tui.widgets.clients import model_style
from deflect.tui.widgets.titlebar import TitleBar

IMAGES = 24  # target images offered (a seeded subset of the test split)
OUTCOME_MARK = {FOOLED: ("✗", "bold white on red3"), DEFLECTED: ("✓", "bold black on green3"),
                VOID: ("·", "bold white on grey35")}


@dataclass
class GameSetup:
    """What a game needs, loaded in a worker: the table, the models and the target images."""

    run_id: str
    dataset: str
    table: SuccessTable
    models: list[Any]
    images: torch.Tensor
    labels: torch.Tensor


def load_setup(store: Any, run_id: str) -> GameSetup:
    from deflect.data import load_dataset
    from deflect.errors import DeflectError
    from deflect.evaluate import select_subset
    from deflect.pool import refuse_pool
    from deflect.sets import load_set

    run = store.run_readonly(run_id)
    if run is None:
        raise DeflectError(f"run {run_id} is no longer in the database")
    refuse_pool(run, "play against run {base}")
    table = SuccessTable.from_evaluations(*as_crafted(store.evaluations(run_id, "transfer"),
                                                      store.evaluations(run_id, "ensemble"), run.dataset))
    if not table.attacks:
        raise DeflectError(f"run {run_id} has no transfer evaluation with the attacks' own settings on the test "
                           f"split yet: deflect evaluate {run_id} --attack pgd1")
    models = [m.eval() for m in load_set(run_id, store)]
    test = load_dataset(run.dataset, "test", run.config.get("data_dir"), False)
    subset = select_subset(test, IMAGES, 0)
    x, y = subset.batch(torch.arange(len(subset)))
    return GameSetup(run_id, run.dataset, table, models, x, y)


def image_text(image: torch.Tensor, max_side: int = 14) -> Text:
    """A greyscale preview with half blocks (two pixel rows per line), downsampled to `max_side`."""
    grey = image.float().mean(0)
    step = max(1, -(-grey.shape[-1] // max_side))
    grey = grey[::step, ::step]
    if grey.shape[0] % 2:
        grey = torch.cat([grey, torch.zeros(1, grey.shape[1])])
    text = Text()
    for r in range(0, grey.shape[0], 2):
        for c in range(grey.shape[1]):
            top, bottom = (int(255 * float(v)) for v in (grey[r, c], grey[r + 1, c]))
            text.append("▀", style=f"rgb({top},{top},{top}) on rgb({bottom},{bottom},{bottom})")
        text.append("\n")
    return text


def rounds_table(game: AttackerGame) -> Table:
    table = Table(header_style="bold", box=None, padding=(0, 1))
    for name in ("round", "attack", "owned", "sent", "fooled", "deflected", "void", "expected"):
        table.add_column(name, justify="right" if name not in ("attack", "owned") else "left")
    for r in game.rounds:
        table.add_row(str(r.number), r.attack, ",".join(f"m{v}" for v in r.owned), str(len(r.results)),
                      f"[red]{r.score}[/]", f"[green]{r.count(DEFLECTED)}[/]", str(r.count(VOID)), f"{r.expected:.1f}")
    return table


def reveal_text(played: GameRound) -> Text:
    text = Text(f"round {played.number}: image {played.image} sent to {len(played.results)} clients\n")
    for i, res in enumerate(played.results):
        if i and i % 6 == 0:
            text.append("\n")
        mark, style = OUTCOME_MARK[res.outcome]
        text.append(f" c{res.client:<3}", style="bold")
        text.append(f" m{res.model} ", style=model_style(res.model) + " bold white")
        text.append(f" {mark} ", style=style)
    return text


class GameScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("enter", "send", "Send", priority=True),
        Binding("a", "attack", "Attack"),
        Binding("i", "image(1)", "Image"),
        Binding("I", "image(-1)", "Prev image", show=False),
        Binding("plus,equals_sign", "clients(1)", "More clients", key_display="+"),
        Binding("minus", "clients(-1)", "Fewer clients", key_display="-", show=False),
        Binding("b", "buy_cursor", "Buy"),
        Binding("left_square_bracket", "shop(-1)", "Shop ←", key_display="[", show=False),
        Binding("right_square_bracket", "shop(1)", "Shop →", key_display="]", show=False),
        Binding("g", "new_game", "New game"),
        *[Binding(str(d), f"buy({d})", "", show=False) for d in range(10)],  # one line in `?`: HELP_KEYS
    ]
    HELP_KEYS = [("0-9", "Buy that model")]

    @dataclass
    class Ready(Message):
        setup: GameSetup | None
        error: str | None = None

    @dataclass
    class Crafted(Message):
        """A crafted example's outcomes, with the choices it was crafted for (keys pressed while it was
        crafting change the next round's choices, not this one's)."""

        outcomes: list[str] | None
        error: str | None = None
        attack: str = ""
        image: int = 0
        count: int = 0

    def __init__(self, run_id: str, rules: dict[str, int] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.run_id = run_id
        self.rule_values = rules or {}
        self.seed = seed
        self.setup: GameSetup | None = None
        self.game: AttackerGame | None = None
        self.attack = 0
        self.image = 0
        self.count = 6
        self.cursor = 0
        self.crafting = False
        self.last: GameRound | None = None
        self.message = ""

    def compose(self) -> ComposeResult:
        yield TitleBar(str(self.app.store.path))  # type: ignore[attr-defined]
        with VerticalScroll(id="game-body"):
            yield Static(f"[b]attacker game[/] · {self.run_id} · loading the models …", id="game-status")
            with Horizontal(id="game-top"):
                with Vertical(id="game-controls"):
                    yield Static("", id="game-shop")
                    yield Static("", id="game-choice")
                yield Static("", id="game-image")
            yield Static("", id="game-reveal")
            yield Static("", id="game-rounds")
            yield Static("", id="game-end")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, group="game-load")
    def load(self) -> None:
        try:
            setup = load_setup(self.app.store, self.run_id)  # type: ignore[attr-defined]
        except Exception as exc:  # no evaluation, missing checkpoint, broken database: say so
            self.post_message(self.Ready(None, str(exc).splitlines()[0]))
            return
        self.post_message(self.Ready(setup))

    def on_game_screen_ready(self, message: Ready) -> None:
        if message.setup is None:
            self.query_one("#game-status", Static).update(f"[red]{escape(message.error or '')}[/]")
            return
        self.setup = message.setup
        self.new_game()

    def new_game(self) -> None:
        assert self.setup is not None
        n = len(self.setup.models)
        rules = GameRules(n=n, **self.rule_values)
        assignment = np.random.default_rng(self.seed).integers(0, n, rules.clients).tolist()
        self.game = AttackerGame(rules, assignment, self.setup.table, seed=self.seed)
        self.last, self.message = None, ""
        self.count = min(self.count, rules.max_send)
        self.render_game()

    # moves ------------------------------------------------------------------------------------
    def action_new_game(self) -> None:
        if self.setup is not None and not self.crafting:
            self.seed += 1
            self.new_game()

    def action_buy(self, model: int) -> None:
        if self.game is None or self.crafting:
            return
        try:
            price = self.game.buy(model)
            self.message = f"bought m{model} for {price}"
        except Exception as exc:
            self.message = f"[red]{escape(str(exc))}[/]"
        self.render_game()

    def action_shop(self, step: int) -> None:
        if self.game is not None:
            self.cursor = (self.cursor + step) % self.game.rules.n
            self.render_game()

    def action_buy_cursor(self) -> None:
        self.action_buy(self.cursor)

    def action_attack(self) -> None:
        if self.game is not None:
            self.attack = (self.attack + 1) % len(self.game.table.attacks)
            self.render_game()

    def action_image(self, step: int) -> None:
        if self.setup is not None:
            self.image = (self.image + step) % len(self.setup.labels)
            self.render_game()

    def action_clients(self, step: int) -> None:
        if self.game is not None:
            self.count = max(1, min(self.game.rules.max_send, self.count + step))
            self.render_game()

    def action_send(self) -> None:
        game, setup = self.game, self.setup
        if game is None or setup is None or self.crafting:
            return
        problem = ("the game is over: g starts a new one" if game.over else
                   "buy a model first (keys 0-9, or [ ] and b)" if not game.owned else
                   f"you can reach at most {game.max_sendable()} clients" if self.count > game.max_sendable()
                   else None)
        if problem:
            self.message = f"[red]{problem}[/]"
            self.render_game()
            return
        self.crafting = True
        self.message = "crafting on your models …"
        self.render_game()
        self.craft(list(game.owned), game.table.attacks[self.attack], self.image, self.count, len(game.rounds) + 1)

    @work(thread=True, exclusive=True, group="game-craft")
    def craft(self, owned: list[int], attack_name: str, image: int, count: int, round_number: int) -> None:
        from deflect.attacks import make_attack
        from deflect.game import craft_outcomes

        setup = self.setup
        assert setup is not None
        try:
            attack = make_attack(attack_name, setup.dataset)
            x, y = setup.images[image:image + 1], setup.labels[image:image + 1]
            outcomes = craft_outcomes(setup.models, owned, attack, x, y, seed=self.seed * 1000 + round_number)
        except Exception as exc:
            self.post_message(self.Crafted(None, str(exc).splitlines()[0]))
            return
        self.post_message(self.Crafted(outcomes, attack=attack_name, image=image, count=count))

    def on_game_screen_crafted(self, message: Crafted) -> None:
        self.crafting = False
        game = self.game
        if game is None or message.outcomes is None:
            self.message = f"[red]{escape(message.error or 'crafting failed')}[/]"
            self.render_game()
            return
        try:
            self.last = game.send(message.attack, message.image, message.count, message.outcomes)
            self.message = f"round {self.last.number}: {self.last.score} fooled"
        except Exception as exc:
            self.message = f"[red]{escape(str(exc))}[/]"
        self.count = max(1, min(self.count, game.max_sendable() or 1))
        self.render_game()

    # drawing ------------------------------------------------------------------------------------
    def render_game(self) -> None:
        game, setup = self.game, self.setup
        if game is None or setup is None:
            return
        rules = game.rules
        owned = " ".join(f"m{v}" for v in sorted(game.owned)) or "none"
        self.query_one("#game-status", Static).update(
            f"[b]attacker game[/] · {self.run_id} · budget [b]{game.budget_left}[/]/{rules.budget} · "
            f"round {min(len(game.rounds) + 1, rules.rounds)}/{rules.rounds} · score [b]{game.score}[/] "
            f"(matrices expected {game.expected_score:.1f})\n{self.message}")
        shop = Text("shop (0-9, or [ ] and b): ")
        for v in range(rules.n):
            label = f" m{v} " + ("owned" if v in game.owned else str(game.next_price()))
            style = model_style(v) + " bold white" + (" reverse" if v == self.cursor else "")
            shop.append(label + " ", style=style)
            shop.append(" ")
        shop.append(f"\nyou own: {owned} · clients: {rules.clients}, each sent example costs {rules.send_cost}")
        self.query_one("#game-shop", Static).update(shop)
        label = int(setup.labels[self.image])
        self.query_one("#game-choice", Static).update(
            f"attack [b]{game.table.attacks[self.attack]}[/] (a) · image [b]{self.image}[/], label {label} (i) · "
            f"send to [b]{self.count}[/] clients (+/-) · [b]enter[/] sends")
        self.query_one("#game-image", Static).update(image_text(setup.images[self.image]))
        self.query_one("#game-reveal", Static).update(reveal_text(self.last) if self.last else
                                                      "[dim]no round played yet[/]")
        self.query_one("#game-rounds", Static).update(rounds_table(game) if game.rounds else "")
        end = self.query_one("#game-end", Static)
        if game.over:
            best = game.optimal()
            models = ",".join(f"m{v}" for v in best.owned)
            end.update(f"[b]game over[/] · you fooled [b]{game.score}[/] clients (the matrices expected "
                       f"{game.expected_score:.1f} for your choices)\nbest play from the transfer matrices: buy "
                       f"{models}, attack {best.attack}, {best.sends} sends → {best.expected:.1f} fooled expected · "
                       "g: new game")
        else:
            end.update("")
