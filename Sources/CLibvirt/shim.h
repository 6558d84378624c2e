// libvirt's C API (Debian: libvirt-dev), for FSShareLibvirt.
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
