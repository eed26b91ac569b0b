"""``python -m instruct.self_instruct``: see :mod:`instruct.self_instruct.cli`."""

from instruct.self_instruct.cli import main

if __name__ == "__main__":
    main()
