from nvr_guard.cli import main

if __name__ == "__main__":
    main()
