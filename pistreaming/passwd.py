"""pistream-passwd: add, change or remove the users of a pistream password file.

    pistream-passwd FILE USER            add USER, or change their password
                                         (asked for twice on the terminal)
    pistream-passwd --stdin FILE USER    the same, the password read from
                                         standard input (for scripts)
    pistream-passwd --delete FILE USER   remove USER
    pistream-passwd --list FILE          the users, one a line

The file holds salted PBKDF2-SHA256 hashes (pistreaming.auth), never the
passwords.  It is written whole to a new file that then takes the old one's
place, with the old one's permissions (a new file: readable by its owner and
group only).  Give it to the daemon with --passwd FILE.
"""

import argparse
import getpass
import os
import sys
import tempfile

from pistreaming.auth import PasswordFileError, hash_password, parse_password_file


def read_users(path):
    try:
        with open(path, encoding="utf-8") as f:
            return parse_password_file(f.read(), path)
    except FileNotFoundError:
        return {}


def write_users(path, users):
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o640
    fd, temporary = tempfile.mkstemp(prefix=".pistream-passwd.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# pistream users (pistream-passwd writes this file)\n")
            for user in sorted(users):
                f.write(f"{user}:{users[user]}\n")
        os.chmod(temporary, mode)
        try:
            stat = os.stat(path)
            os.chown(temporary, stat.st_uid, stat.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def ask_password(user, from_stdin):
    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit("pistream-passwd: no password on standard input")
        return line.rstrip("\r\n")
    first = getpass.getpass(f"Password for {user}: ")
    if getpass.getpass("Again: ") != first:
        raise SystemExit("pistream-passwd: the passwords differ; nothing changed")
    return first


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="pistream-passwd",
        description="Add, change or remove the users of a pistream password file.")
    parser.add_argument("file", help="the password file (made if it does not exist)")
    parser.add_argument("user", nargs="?", help="the user to add, change or remove")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("-d", "--delete", action="store_true", help="remove the user")
    action.add_argument("-l", "--list", action="store_true", help="list the users")
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from standard input")
    args = parser.parse_args(argv)
    try:
        users = read_users(args.file)
        if args.list:
            for user in sorted(users):
                print(user)
            return 0
        if not args.user:
            parser.error("a user is needed (or --list)")
        if ":" in args.user or not args.user.strip() or args.user != args.user.strip():
            raise SystemExit(f"pistream-passwd: {args.user!r}: a user name has no ':' "
                             "and no leading or trailing spaces")
        if args.delete:
            if args.user not in users:
                raise SystemExit(f"pistream-passwd: {args.user} is not in {args.file}")
            del users[args.user]
        else:
            password = ask_password(args.user, args.stdin)
            if not password:
                raise SystemExit("pistream-passwd: the password is empty; nothing changed")
            users[args.user] = hash_password(password)
        write_users(args.file, users)
    except PasswordFileError as e:
        raise SystemExit(f"pistream-passwd: {e}") from None
    except OSError as e:
        raise SystemExit(f"pistream-passwd: {args.file}: {e.strerror.lower()}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
