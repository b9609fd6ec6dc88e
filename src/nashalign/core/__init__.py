"""The math: pure losses, finite preference games, the game lab's algorithms."""
