#!/bin/sh
# ptychostream simulated detector IOC. Macro: P (image channel $(P)Pva1:Image).
: "${P:=PTY:SIM:}"
here=$(cd "$(dirname "$0")" && pwd)
exec ptychostream simdet --prefix "$P" --config "$here/simdetector.toml" "$@"
