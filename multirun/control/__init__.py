"""The closed loop: controllers turn monitor results into spans for the next window."""
