from headstore.cli import main

main()
