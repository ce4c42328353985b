"""Build hook: generate protobuf/gRPC modules from proto/ with grpcio-tools (never committed, never hand-edited)."""

from __future__ import annotations

from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "proto"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    for source in sources:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={PROTO_ROOT}",
            f"--pyi_out={PROTO_ROOT}",
            f"--grpc_python_out={PROTO_ROOT}",
            source,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {source}")
    for package_dir in {p.parent for p in PROTO_ROOT.rglob("*.proto")}:
        (package_dir / "__init__.py").touch()
        for parent in package_dir.relative_to(PROTO_ROOT).parents:
            if str(parent) != ".":
                (PROTO_ROOT / parent / "__init__.py").touch()


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()

    def find_package_modules(self, package, package_dir):  # type: ignore[no-untyped-def]
        # Generated files appear after find_packages ran; make sure they are listed.
        generate_protos()
        return super().find_package_modules(package, package_dir)


setup(
    cmdclass={"build_py": BuildPyWithProtos},
    packages=[
        *find_packages(include=["control_plane", "control_plane.*", "data_plane", "data_plane.*"]),
        "mtlsgate",
        "mtlsgate.v1",
    ],
)
