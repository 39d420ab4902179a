"""``python -m gpt2exp.cli``: the ``gpt2exp`` command."""

from gpt2exp.cli import main

if __name__ == "__main__":
    main()
