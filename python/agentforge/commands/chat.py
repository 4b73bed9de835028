"""``agentforge chat TARGET``: a conversation with a model, its replies streamed token by token.

TARGET is what ``agentforge generate`` takes: a ``model.afz``, a model directory, or a run's
phase (``runs/tiny/08-compression`` or ``runs/tiny/compression``). The conversation so far goes
through the tokenizer's chat template when it has one; a tokenizer without one (the pipeline's
own) sees each message alone. Type ``/exit`` or end the input (Ctrl-D) to quit.

    agentforge chat runs/tiny/compression
    agentforge chat runs/tiny/compression --message "12+7=" --message "3+4="   # for scripts
"""

from __future__ import annotations

import sys

HELP = "talk to a model (streamed replies; --message for scripts)"
EXIT = "/exit"


def add_arguments(parser) -> None:
    from agentforge.commands.generate import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest reply in tokens (default 128)")
    parser.add_argument(
        "--message",
        action="append",
        metavar="TEXT",
        help="send TEXT instead of reading the keyboard (repeatable: one turn each, in order)",
    )


def _typed(interactive: bool):
    """The user's messages from standard input until ``/exit`` or its end."""
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # the shell prompt after Ctrl-D starts on its own line
            return
        if line.strip() == EXIT:
            return
        if line.strip():
            yield line


def run(args) -> int:
    from agentforge.commands.generate import load_agent

    agent = load_agent(args)
    interactive = args.message is None and sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        parts = ", ".join(name for name, attached in agent.parts.items() if attached) or "none"
        print(f"{args.target}: trained parts attached: {parts}; {EXIT} or Ctrl-D to quit", file=sys.stderr)
    messages: list[dict] = []
    for text in args.message if args.message is not None else _typed(interactive):
        messages.append({"role": "user", "content": text})
        shown: list[str] = []

        def show(piece: str, shown: list[str] = shown) -> None:
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        reply = agent.chat(messages, max_new_tokens=args.max_new_tokens, think=args.think, stream=show)
        if "".join(shown).strip():
            sys.stdout.write("\n")
        else:
            print("(empty reply: the model ended its turn at once)", file=sys.stderr)
        messages.append({"role": "assistant", "content": reply})
    return 0
