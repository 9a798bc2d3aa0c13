# The Debian package: `cmake --build BUILD --target package` writes
# BUILD/nbdkit-cbt_VERSION_ARCH.deb (CPack's DEB generator; see
# docs/service.md#the-debian-package).
#
# Name: nbdkit-cbt, not cbt. The tool is /usr/bin/cbt, the same path as
# Google's Bigtable client (package google-cloud-cli-cbt, formerly
# google-cloud-sdk-cbt, which ships /usr/bin/cbt as a symlink to
# /usr/lib/google-cloud-sdk/bin/cbt). dpkg would refuse to overwrite
# that file anyway; Conflicts says so up front, and nothing Replaces it.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME nbdkit-cbt)
set(CPACK_PACKAGE_VENDOR "cbt")
set(CPACK_PACKAGE_CONTACT "cbt maintainers <cbt@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "changed block tracking for nbdkit: filter, qcow2 plugin and the cbt tool")
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION
    "nbdkit-cbt-filter records which parts of a disk change in dirty bitmaps\n\
stored in qcow2 files, in the format QEMU uses, and keeps them usable after\n\
kill -9 or a power cut. Also: nbdkit-qcow2-plugin (qcow2 images read-write,\n\
bitmaps inside the image) and cbt, the tool that manages the bitmaps and\n\
makes incremental backups. Not Google's Bigtable cbt.")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
# Binaries stripped in the package (the build tree keeps its debug info).
set(CPACK_STRIP_FILES ON)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_CONFLICTS "google-cloud-cli-cbt, google-cloud-sdk-cbt")
# The filter and the plugin are built against this nbdkit and refused by
# any other version (nbdkit compares the version it was built from): pin it.
find_package(PkgConfig REQUIRED)
pkg_check_modules(CBT_NBDKIT REQUIRED nbdkit)  # CBT_NBDKIT_VERSION, e.g. 1.32.5
# The runtime libraries (libnbd0, libfmt, libspdlog, boost program_options,
# libstdc++) from dpkg-shlibdeps when it is there; nbdkit itself is not a
# shared library dependency (the modules resolve its symbols when loaded).
find_program(CBT_DPKG_SHLIBDEPS dpkg-shlibdeps)
if(CBT_DPKG_SHLIBDEPS)
  set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
  set(CPACK_DEBIAN_PACKAGE_DEPENDS "nbdkit (>= ${CBT_NBDKIT_VERSION}), nbdkit (<< ${CBT_NBDKIT_VERSION}.~)")
else()
  set(CPACK_DEBIAN_PACKAGE_DEPENDS
      "nbdkit (>= ${CBT_NBDKIT_VERSION}), nbdkit (<< ${CBT_NBDKIT_VERSION}.~), libnbd0, libstdc++6")
endif()
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "qemu-utils, libnbd-bin")
include(CPack)
