"""One module per `nashalign <command>`: argument parsing and printing only; the work lives in the library."""
