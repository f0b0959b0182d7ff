"""Guest layout: which filesystem is the root, where fstab mounts the others, `//LOCATOR` names. Pure."""

from __future__ import annotations

from hostguard.imagefs import FilesystemInfo
from hostguard.imagefs.layout import Layout, match_spec, parse_fstab, plan

ROOT = FilesystemInfo("disk0p1", "ext4", 0, 1, uuid="11111111-2222-3333-4444-555555555555", label=b"root")
BOOT = FilesystemInfo("disk0p2", "ext4", 0, 2, uuid="aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", label=b"boot",
                      partuuid="0f0f0f0f-1111-2222-3333-444444444444", partlabel="ESP-ish")  # fmt: skip
DATA = FilesystemInfo("disk1", "ext4", 1, None, uuid="99999999-8888-7777-6666-555555555555", label=b"my data")
LV = FilesystemInfo("lvm:vg-x:home", "xfs")
ALL = [ROOT, BOOT, DATA, LV]


def test_parse_fstab_skips_comments_swap_and_pseudo_filesystems() -> None:
    text = (
        b"# /etc/fstab\n\n"
        b"UUID=11111111-2222-3333-4444-555555555555 / ext4 errors=remount-ro 0 1\n"
        b"/dev/sda3 none swap sw 0 0\n"
        b"proc /proc proc defaults 0 0\n"
        b"tmpfs /tmp tmpfs defaults 0 0\n"
        b"short-line\n"
    )
    assert parse_fstab(text) == []  # "/" itself is never a placement: the root is the fstab's holder


def test_parse_fstab_exact() -> None:
    entries = parse_fstab(
        b"LABEL=a /boot ext4 d 0 0\nLABEL=b /srv/my\\040x ext4 d 0 0\n/dev/sdb /mnt//x/./y/ ext4 d 0 0\n"
    )
    assert entries == [(b"LABEL=a", b"/boot"), (b"LABEL=b", b"/srv/my x"), (b"/dev/sdb", b"/mnt/x/y")]
    assert parse_fstab(b"/dev/sdc /a/../etc ext4 d 0 0\nUUID=x / ext4 d 0 1\n") == []


def test_match_spec_forms() -> None:
    assert match_spec(b"UUID=AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE", ALL) is BOOT
    assert match_spec(b'UUID="aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"', ALL) is BOOT
    assert match_spec(b"LABEL=my data", ALL) is DATA
    assert match_spec(b"PARTUUID=0f0f0f0f-1111-2222-3333-444444444444", ALL) is BOOT
    assert match_spec(b"PARTLABEL=ESP-ish", ALL) is BOOT
    assert match_spec(b"/dev/disk/by-uuid/99999999-8888-7777-6666-555555555555", ALL) is DATA
    assert match_spec(b"/dev/disk/by-label/boot", ALL) is BOOT
    assert match_spec(b"/dev/vda1", ALL) is ROOT
    assert match_spec(b"/dev/sda2", ALL) is BOOT
    assert match_spec(b"/dev/xvdb", ALL) is DATA
    assert match_spec(b"/dev/sdb1", ALL) is None
    assert match_spec(b"/dev/vg-x/home", ALL) is LV
    assert match_spec(b"/dev/mapper/vg--x-home", ALL) is LV
    assert match_spec(b"UUID=00000000-0000-0000-0000-000000000000", ALL) is None
    assert match_spec(b"server:/export", ALL) is None


def test_plan_with_fstab_and_hidden_files() -> None:
    fstab = (
        b"LABEL=root / ext4 d 0 1\n"
        b"UUID=aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee /boot ext4 d 0 2\n"
        b"LABEL=my\\040data /boot/efi ext4 d 0 2\n"  # nested mount
        b"/dev/sda2 /other ext4 d 0 0\n"  # a second mountpoint for BOOT: the first wins
    )
    layout = plan([ROOT, BOOT, DATA], {"disk0p1": fstab})
    assert layout.mounts == {"disk0p1": b"", "disk0p2": b"/boot", "disk1": b"/boot/efi"}
    assert layout.root == "disk0p1"
    g = layout.guest_path
    assert g("disk0p1", b"/usr/bin/ls") == b"/usr/bin/ls"
    assert g("disk0p1", b"/boot/vmlinuz") == b"//disk0p1/boot/vmlinuz"  # hidden by the /boot mount
    assert g("disk0p1", b"/bootstrap") == b"/bootstrap"
    assert g("disk0p2", b"/vmlinuz") == b"/boot/vmlinuz"
    assert g("disk0p2", b"/efi/x") == b"//disk0p2/efi/x"  # hidden by the nested /boot/efi mount
    assert g("disk1", b"/EFI/grub.efi") == b"/boot/efi/EFI/grub.efi"


def test_plan_without_fstab() -> None:
    assert plan([DATA], {}).mounts == {"disk1": b""}
    two = plan([ROOT, DATA], {})
    assert two.mounts == {}
    assert two.guest_path("disk1", b"/bin/x") == b"//disk1/bin/x"
    both = plan([ROOT, DATA], {"disk0p1": b"", "disk1": b""})  # two roots: ambiguous, nothing placed
    assert both.mounts == {} and both.root is None


def test_layout_unplaced_filesystem() -> None:
    layout = Layout({"disk0p1": b""})
    assert layout.guest_path("disk0p3", b"/tool") == b"//disk0p3/tool"


# --- Btrfs subvolumes (ADR 0022) ----------------------------------------------------------------------------

BU = "12345678-0000-0000-0000-00000000abcd"
TOP = FilesystemInfo("disk0p2", "btrfs", 0, 2, uuid=BU, subvolume="", subvolid=5)
AT = FilesystemInfo("disk0p2:subvolid=256", "btrfs", 0, 2, uuid=BU, subvolume="@", subvolid=256)
HOME = FilesystemInfo("disk0p2:subvolid=257", "btrfs", 0, 2, uuid=BU, subvolume="@home", subvolid=257)
NEST = FilesystemInfo("disk0p2:subvolid=260", "btrfs", 0, 2, uuid=BU, subvolume="@/srv/x", subvolid=260)
SNAP = FilesystemInfo("disk0p2:subvolid=261", "btrfs", 0, 2, uuid=BU, subvolume="snaps/1", subvolid=261,
                      default_subvolume=True)  # fmt: skip
BTRFS = [TOP, AT, HOME, NEST, SNAP]


def test_btrfs_fstab_options_select_the_subvolume_as_the_kernel_does() -> None:
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"subvol=@home") is HOME
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"rw,subvol=/@home/,compress=zstd") is HOME
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"subvolid=256") is AT
    assert match_spec(b"/dev/vda2", BTRFS, b"subvolid=256,subvol=@") is AT
    assert match_spec(b"/dev/vda2", BTRFS, b"subvolid=256,subvol=@home") is None  # the kernel refuses the mount
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"defaults") is SNAP  # no option: the default subvolume
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"subvolid=0") is SNAP  # 0: "not given"
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"subvol=@nope") is None
    assert match_spec(f"UUID={BU}".encode(), BTRFS, b"subvolid=x") is None


def test_btrfs_layout_places_fstab_subvolumes_and_nested_ones() -> None:
    fstab = f"UUID={BU} / btrfs subvol=@ 0 0\nUUID={BU} /home btrfs subvol=@home 0 0\n".encode()
    layout = plan(BTRFS, {AT.locator: fstab})
    assert layout.mounts == {AT.locator: b"", HOME.locator: b"/home", NEST.locator: b"/srv/x"}
    assert layout.guest_path(NEST.locator, b"/tool") == b"/srv/x/tool"
    assert layout.guest_path(TOP.locator, b"/tool") == b"//disk0p2/tool"  # the top level is not mounted
    assert layout.guest_path(SNAP.locator, b"/bin/x") == b"//disk0p2:subvolid=261/bin/x"
    # The top level mounted somewhere: unplaced subvolumes appear inside it.
    with_top = fstab + f"UUID={BU} /mnt/pool btrfs subvolid=5 0 0\n".encode()
    layout = plan(BTRFS, {AT.locator: with_top})
    assert layout.mounts[SNAP.locator] == b"/mnt/pool/snaps/1"
    assert layout.mounts[NEST.locator] == b"/srv/x"  # the nearest placed subvolume holding it


def test_btrfs_root_among_several_fstab_snapshots_is_the_default_subvolume() -> None:
    """openSUSE: every root snapshot holds an /etc/fstab; the default subvolume is what boots."""
    fstab = f"UUID={BU} / btrfs defaults 0 0\nUUID={BU} /home btrfs subvol=/@home 0 0\n".encode()
    layout = plan(BTRFS, {SNAP.locator: fstab, AT.locator: fstab})
    assert layout.root == SNAP.locator
    assert layout.mounts[HOME.locator] == b"/home"
    # Without a default among them (or across filesystems): no root, everything by locator.
    not_default = [f for f in BTRFS if f is not SNAP]
    assert plan(not_default, {AT.locator: fstab, NEST.locator: fstab}).mounts == {}
    assert plan([*BTRFS, ROOT], {SNAP.locator: fstab, ROOT.locator: fstab}).mounts == {}
