"""Model specs: every form, constructor arguments, and a clear error for every way a spec can be wrong."""

import sys
import textwrap

import pytest
import torchvision
from torch import nn

from acnet_convert import ACNetError
from acnet_convert.cli.spec import ModelSpec, parse_args

NET = """
from torch import nn
from helpers import WIDTH


class Net(nn.Module):
    def __init__(self, width=WIDTH, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3)


def small(num_classes=2):
    return Net(width=4, num_classes=num_classes)


def not_a_model():
    return 42
"""


@pytest.fixture
def model_file(tmp_path):
    (tmp_path / "helpers.py").write_text("WIDTH = 6\n")
    path = tmp_path / "net.py"
    path.write_text(NET)
    return path


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error(spec, *args):
    with pytest.raises(ACNetError) as caught:
        ModelSpec(spec, args).build()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_file_spec_builds_the_only_class_constructible_without_arguments(model_file):
    model = ModelSpec(str(model_file)).build()
    assert type(model).__name__ == "Net" and model.conv.out_channels == 6  # the neighbour module was imported


def test_file_spec_prefers_build_model(tmp_path):
    path = write(
        tmp_path,
        "factory.py",
        """
        from torch import nn
        class Net(nn.Module):
            pass
        def build_model(width=5):
            return nn.Conv2d(3, width, 3)
    """,
    )
    assert ModelSpec(path, ("width=7",)).build().out_channels == 7


def test_named_class_and_named_factory_with_arguments(model_file):
    assert ModelSpec(f"{model_file}:Net", ("width=5", "num_classes=4")).build().head.out_features == 4
    assert ModelSpec(f"{model_file}:Block", ("channels=2",)).build().conv.in_channels == 2
    assert ModelSpec(f"{model_file}:small").build().conv.out_channels == 4


def test_package_module_spec(tmp_path, monkeypatch):
    package = tmp_path / "specpkg_modules"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text("from torch import nn\ndef tiny(k=3):\n    return nn.Conv2d(1, 1, k)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert ModelSpec("specpkg_modules.models:tiny", ("k=5",)).build().kernel_size == (5, 5)


def test_torchvision_spec_passes_arguments():
    model = ModelSpec("torchvision:resnet18", ("num_classes=7",)).build()
    reference = torchvision.models.resnet18(num_classes=7)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 7
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_timm_spec():
    import timm

    model = ModelSpec("timm:resnet10t", ("num_classes=3",)).build()
    assert model.state_dict().keys() == timm.create_model("resnet10t", num_classes=3).state_dict().keys()


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("n=3", 3),
        ("x=0.5", 0.5),
        ("flag=True", True),
        ("flag=false", False),
        ("name=resnet", "resnet"),
        ("size=(3, 5)", (3, 5)),
        ("opt=None", None),
        ("s='7'", "7"),
    ],
)
def test_arg_values_are_python_literals_else_strings(text, value):
    assert parse_args([text]) == {text.partition("=")[0]: value}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["nope"], "is not key=value"), (["a=1", "a=2"], "given twice"), (["1x=2"], "is not key=value")],
)
def test_bad_args(args, fragment):
    with pytest.raises(ACNetError, match=fragment):
        parse_args(args)


def test_stem_names_default_outputs():
    assert [ModelSpec(s).stem for s in ("a/b/net.py", "net.py:Net", "pkg.models:build", "torchvision:resnet18")] == [
        "net",
        "Net",
        "build",
        "resnet18",
    ]


def test_missing_file(tmp_path):
    assert "not found" in error(str(tmp_path / "absent.py"))


def test_syntax_error_names_the_line(tmp_path):
    message = error(write(tmp_path, "broken.py", "import torch\ndef f(:\n    pass\n"))
    assert "broken.py line 2: syntax error" in message


def test_exception_while_importing_names_the_line(tmp_path):
    message = error(write(tmp_path, "raises.py", "import torch\n\nraise RuntimeError('no GPU here')\n"))
    assert "raises.py line 3" in message and "RuntimeError: no GPU here" in message


def test_exception_in_the_constructor_names_the_line(tmp_path):
    path = write(
        tmp_path,
        "ctor.py",
        """
        from torch import nn
        class Net(nn.Module):
            def __init__(self, width=3):
                super().__init__()
                self.conv = nn.Conv2d(3, width, 3, padding=width // 0)
    """,
    )
    message = error(path)
    assert "building" in message and "ctor.py line 6" in message and "ZeroDivisionError" in message


def test_several_candidates_are_listed(tmp_path):
    path = write(
        tmp_path,
        "two.py",
        """
        from torch import nn
        class A(nn.Module):
            pass
        class B(nn.Module):
            pass
    """,
    )
    message = error(path)
    assert "several models (A, B)" in message and f"{path}:NAME" in message


def test_no_model_in_file(tmp_path):
    assert "no nn.Module subclass and no build_model()" in error(write(tmp_path, "empty.py", "X = 1\n"))


def test_no_class_buildable_without_arguments(model_file, tmp_path):
    message = error(
        write(
            tmp_path,
            "needs.py",
            """
        from torch import nn
        class Net(nn.Module):
            def __init__(self, channels):
                super().__init__()
    """,
        )
    )
    assert "no model class" in message and "Net" in message and "--arg" in message


def test_missing_name_lists_or_suggests_candidates(model_file):
    assert "it defines Net, Block, small, not_a_model" in error(f"{model_file}:Model")
    assert "did you mean small" in error(f"{model_file}:smal")


def test_factory_returning_something_else(model_file):
    assert "returned a int, not a torch.nn.Module" in error(f"{model_file}:not_a_model")


def test_unknown_torchvision_and_timm_models_suggest_names():
    assert "did you mean resnet18" in error("torchvision:resnet81")
    assert "resnet18" in error("timm:resnt18")
    assert "names no model" in error("torchvision:")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("no_such_package_anywhere.models:Net", "no module named 'no_such_package_anywhere'"),
        ("not a spec", "cannot read the model spec"),
        ("model.py:9lives", "is not a Python name"),
    ],
)
def test_unreadable_specs(spec, fragment):
    assert fragment in error(spec)


def test_bad_constructor_argument(model_file):
    assert "--arg depth is not an argument of" in error(f"{model_file}:Net", "depth=3")
    assert "(it takes width, num_classes)" in error(f"{model_file}:Net", "depth=3")


def test_build_returns_a_fresh_model_each_time(model_file):
    spec = ModelSpec(str(model_file))
    first, second = spec.build(), spec.build()
    assert first is not second and type(first) is type(second) and isinstance(first, nn.Module)
