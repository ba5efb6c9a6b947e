"""Where every span goes: the static schedule, the run plan, and the controllers' dynamic spans."""
