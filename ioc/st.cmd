#!/bin/sh
# ptychostream reconstructor soft IOC: the st.cmd of this instance.
# Macros: P and R form the PV prefix $(P)$(R). Network settings come from the standard
# EPICS_* variables (EPICS_PVAS_INTF_ADDR_LIST, EPICS_CAS_INTF_ADDR_LIST, ...), as for any IOC.
: "${P:=PTY:}"
: "${R:=NN:}"
here=$(cd "$(dirname "$0")" && pwd)
exec ptychostream ioc --prefix "$P$R" --config "$here/reconstructor.toml" "$@"
