#!/bin/sh
# Builds qpq and installs the binary, its man pages and shell completions under PREFIX; with
# --systemd also the qpq.service unit and its user. Every file it writes is listed in a manifest,
# so --uninstall removes exactly those. Needs only cargo and a C compiler (or --binary). The build
# is static (crt-static, as the README's "A static binary" describes), so the installed file can be
# copied to another machine as it is; --dynamic links the C library dynamically instead.
set -eu

usage() {
    cat <<'EOF'
install.sh: build and install qpq

Usage: ./install.sh [OPTIONS]

Options:
  --binary PATH   install this prebuilt qpq instead of running cargo build --release
  --dynamic       build a dynamically linked binary (default: static, crt-static)
  --systemd       also install the qpq.service unit and create the system user qpq
  --no-user       with --systemd: do not create the user (packaging, tests)
  --uninstall     remove everything the last install listed in its manifest
  -h, --help      print this help

Environment:
  PREFIX        install root [default: /usr/local]
  SYSTEMD_DIR   where the unit goes [default: /etc/systemd/system]
  CARGO         cargo to build with [default: cargo]
  RUSTC         rustc asked for the host target of a static build [default: rustc]

The default build is static (RUSTFLAGS gains -C target-feature=+crt-static, for the host
target): the installed file has no dependencies and can be copied to another machine as it is.
--dynamic builds the ordinary dynamically linked binary.

Installs PREFIX/bin/qpq, PREFIX/share/man/man1/qpq*.1, completions for bash, zsh and fish under
PREFIX/share, and the manifest PREFIX/share/qpq/install-manifest. Running it again updates the
installation. The unit runs `qpq serve` as user qpq with its data in /var/lib/qpq; start it with
`systemctl enable --now qpq`. --uninstall leaves /var/lib/qpq (the server's data) in place.
EOF
}

die() {
    printf 'install.sh: %s\n' "$*" >&2
    exit 1
}

note() {
    printf 'install.sh: %s\n' "$*"
}

here=$(cd "$(dirname "$0")" && pwd)
binary=
static=true
systemd=false
create_user=true
uninstall=false
while [ $# -gt 0 ]; do
    case $1 in
        --binary)
            [ $# -ge 2 ] || die "--binary needs a PATH"
            binary=$2
            shift
            ;;
        --binary=*) binary=${1#--binary=} ;;
        --dynamic) static=false ;;
        --systemd) systemd=true ;;
        --no-user) create_user=false ;;
        --uninstall) uninstall=true ;;
        -h | --help)
            usage
            exit 0
            ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

prefix=${PREFIX:-/usr/local}
case $prefix in
    /*) ;;
    *) prefix=$(pwd)/$prefix ;;
esac
systemd_dir=${SYSTEMD_DIR:-/etc/systemd/system}
manifest=$prefix/share/qpq/install-manifest
unit_name=qpq.service
service_user=qpq

# systemctl is only used for the real unit directory on a machine booted with systemd, so a test
# pointing SYSTEMD_DIR at a temp dir never touches a running service.
manages_systemd() {
    [ "$1" = "/etc/systemd/system/$unit_name" ] && [ -d /run/systemd/system ] &&
        command -v systemctl >/dev/null 2>&1
}

do_uninstall() {
    [ -f "$manifest" ] || die "nothing to uninstall: no manifest at $manifest"
    while IFS= read -r entry; do
        case $entry in
            "file "*"/$unit_name")
                if manages_systemd "${entry#file }"; then
                    systemctl disable --now "$unit_name" || true
                fi
                ;;
        esac
    done <"$manifest"
    removed=0
    reload=false
    while IFS= read -r entry; do
        case $entry in
            "file "*)
                path=${entry#file }
                if manages_systemd "$path"; then reload=true; fi
                rm -f "$path"
                removed=$((removed + 1))
                ;;
            "user "*)
                user=${entry#user }
                if id "$user" >/dev/null 2>&1; then
                    userdel "$user" || note "could not delete user $user"
                fi
                ;;
        esac
    done <"$manifest"
    if [ "$reload" = true ]; then systemctl daemon-reload || true; fi
    rm -f "$manifest"
    rmdir "$prefix/share/qpq" 2>/dev/null || true
    note "removed $removed files installed under $prefix"
    if [ -d /var/lib/qpq ]; then note "kept the server data in /var/lib/qpq"; fi
}

if [ "$uninstall" = true ]; then
    do_uninstall
    exit 0
fi

if [ -z "$binary" ]; then
    cargo=${CARGO:-cargo}
    command -v "$cargo" >/dev/null 2>&1 || die "cargo not found: install Rust or pass --binary PATH"
    target_dir=${CARGO_TARGET_DIR:-$here/target}
    if [ "$static" = true ]; then
        # crt-static needs an explicit --target, or build scripts and proc macros would be linked
        # statically too; the host's triple keeps the binary native.
        rustc=${RUSTC:-rustc}
        host=$("$rustc" -vV | sed -n 's/^host: //p')
        [ -n "$host" ] || die "cannot tell the host target from $rustc -vV (or pass --dynamic)"
        RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
            "$cargo" build --release --locked --target "$host" --manifest-path "$here/Cargo.toml"
        binary=$target_dir/$host/release/qpq
    else
        "$cargo" build --release --locked --manifest-path "$here/Cargo.toml"
        binary=$target_dir/release/qpq
    fi
fi
if [ ! -f "$binary" ] || [ ! -x "$binary" ]; then die "not an executable file: $binary"; fi
"$binary" --version >/dev/null || die "$binary does not run"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM
new_manifest=$tmp/manifest
: >"$new_manifest"

# put SRC DEST MODE: copies atomically (a running qpq keeps its old file) and records DEST.
put() {
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.new.$$"
    chmod "$3" "$2.new.$$"
    mv -f "$2.new.$$" "$2"
    printf 'file %s\n' "$2" >>"$new_manifest"
}

# Man pages and completions come from the binary being installed, so they always match it.
"$binary" man "$tmp/man" >/dev/null
"$binary" completions bash >"$tmp/qpq.bash"
"$binary" completions zsh >"$tmp/_qpq"
"$binary" completions fish >"$tmp/qpq.fish"

put "$binary" "$prefix/bin/qpq" 755
for page in "$tmp"/man/*.1; do
    put "$page" "$prefix/share/man/man1/$(basename "$page")" 644
done
put "$tmp/qpq.bash" "$prefix/share/bash-completion/completions/qpq" 644
put "$tmp/_qpq" "$prefix/share/zsh/site-functions/_qpq" 644
put "$tmp/qpq.fish" "$prefix/share/fish/vendor_completions.d/qpq.fish" 644

if [ "$systemd" = true ]; then
    [ -f "$here/packaging/$unit_name" ] || die "missing $here/packaging/$unit_name"
    # @BINDIR@ -> PREFIX/bin; '|' and '&' would be special to sed, so they are refused.
    case $prefix in
        *'|'* | *'&'*) die "PREFIX must not contain '|' or '&' for the unit file" ;;
    esac
    sed "s|@BINDIR@|$prefix/bin|g" "$here/packaging/$unit_name" >"$tmp/$unit_name"
    put "$tmp/$unit_name" "$systemd_dir/$unit_name" 644
    if [ "$create_user" = true ] && ! id "$service_user" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/qpq --no-create-home \
            --shell /usr/sbin/nologin "$service_user"
        printf 'user %s\n' "$service_user" >>"$new_manifest"
        note "created system user $service_user"
    fi
    if manages_systemd "$systemd_dir/$unit_name"; then systemctl daemon-reload; fi
fi

# Entries of an earlier install that this one did not write: stale files (a man page of a removed
# subcommand) go; a unit installed by an earlier --systemd run and the user it created stay listed,
# so --uninstall still removes them.
if [ -f "$manifest" ]; then
    while IFS= read -r entry; do
        grep -Fxq -- "$entry" "$new_manifest" && continue
        case $entry in
            "user "*) printf '%s\n' "$entry" >>"$new_manifest" ;;
            "file "*"/$unit_name")
                if [ -f "${entry#file }" ]; then printf '%s\n' "$entry" >>"$new_manifest"; fi
                ;;
            "file "*) rm -f "${entry#file }" ;;
        esac
    done <"$manifest"
fi
mkdir -p "$(dirname "$manifest")"
cp "$new_manifest" "$manifest"
chmod 644 "$manifest"

note "installed $("$prefix/bin/qpq" --version) under $prefix ($(grep -c '^file ' "$manifest") files, listed in $manifest)"
if [ "$systemd" = true ]; then
    note "unit $systemd_dir/$unit_name: start it with systemctl enable --now qpq"
fi
