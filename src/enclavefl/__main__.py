from enclavefl.cli import main

main()
