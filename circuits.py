"""A trained QNN as a circuit a device can run: OpenQASM 2 from TensorCircuit's exporter.

The exported circuit is the QNN's layers gate by gate (rx, ry, rx on every qubit, then the rzz ring; or rx, ry and
the CNOT ring), in float64 angles, with the amplitude-encoded input as a named placeholder (a comment and a barrier:
no device prepares an arbitrary state cheaply, and OpenQASM 2 has no instruction for it) and the readout, a
measurement of the last qubit: p(y=1|x) = sigmoid(readout * <Z_{n-1}>). Qubit i of the QNN is q[i] of the file.
``rzz`` is the gate of Qiskit's ``qelib1.inc`` (``qiskit.qasm2.LEGACY_CUSTOM_INSTRUCTIONS``), as TensorCircuit
writes it.
"""

import json

import numpy as np
import tensorcircuit as tc

PLACEHOLDER = "amplitude_encoding"


def gate_circuit(qnn, params):
    """The QNN's circuit gate by gate (no input), a ``tc.Circuit`` on float64 angles."""
    n, theta = qnn.n_qubits, np.asarray(params, np.float64)
    c = tc.Circuit(n)
    for layer in theta:
        for q in range(n):
            c.rx(q, theta=layer[q, 0])
            c.ry(q, theta=layer[q, 1])
            if qnn.ansatz != "cnot":
                c.rx(q, theta=layer[q, 2])
        for q in range(n):
            if qnn.ansatz == "rzz":
                c.rzz(q, (q + 1) % n, theta=layer[q, 3])
            elif qnn.ansatz == "cnot":
                c.cnot(q, (q + 1) % n)
    return c


def to_openqasm(qnn, params):
    """OpenQASM 2 of a trained QNN: the input placeholder, the circuit, and the measured read-out qubit."""
    n = qnn.n_qubits
    body = gate_circuit(qnn, params).to_openqasm().splitlines()
    header, gates = body[:3], body[3:]  # OPENQASM, include, qreg
    readout = {"qubit": n - 1, "observable": "Z", "p_y1": f"sigmoid({qnn.readout} * <Z_{n - 1}>)"}
    return "\n".join([
        *header, "creg c[1];",
        f"// {PLACEHOLDER}: prepare the input |x> (the normalised, zero-padded sample; q[0] its most significant "
        "bit) on every qubit; ideal, not part of this file",
        f"barrier {','.join(f'q[{q}]' for q in range(n))};",
        *gates,
        f"// readout: {json.dumps(readout)}",
        f"measure q[{n - 1}] -> c[0];", ""])
