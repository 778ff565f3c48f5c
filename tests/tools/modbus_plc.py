#!/usr/bin/env python3
"""A PLC stand-in for the edge's Modbus/TCP link tests and benchmark: an independent Modbus/TCP
server (pymodbus) with 64 coils and 256 holding registers from address 0, which appends every
write it accepts to a JSON-lines log: {"t": seconds since the epoch, "fc": function code,
"address": first address, "values": [...]}.

Usage: modbus_plc.py --port PORT --log FILE   (pip install pymodbus==3.16.1)
"""

import argparse
import asyncio
import json
import sys
import time

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

WRITES = {5, 6, 15, 16}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    log = open(args.log, "a", buffering=1)

    async def record(fc, _start, address, _count, _current, set_values):
        if fc in WRITES and set_values is not None:
            values = [int(v) for v in set_values]
            log.write(json.dumps({"t": time.time(), "fc": fc, "address": address, "values": values}) + "\n")
        return None

    device = SimDevice(
        id=0,
        simdata=(
            [SimData(0, count=64, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=256, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)],
        ),
        action=record,
    )
    server = ModbusTcpServer(device, address=("127.0.0.1", args.port))
    print(f"modbus plc: listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
