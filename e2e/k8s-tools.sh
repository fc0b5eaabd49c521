# The Kubernetes tools of the API harness (e2e/k8s-lib.sh) and where their binaries live. Sourced
# by e2e/install-deps (which builds them) and e2e/k8s-lib.sh (which runs them).
#
# The versions are read from the wrapper modules' go.mod files, the one place they are pinned:
#   e2e/tools/kubernetes     k8s.io/kubernetes (kube-apiserver, kube-controller-manager, kubectl)
#   e2e/tools/etcd           go.etcd.io/etcd/server/v3
#   e2e/tools/csi-provisioner github.com/kubernetes-csi/external-provisioner/v5
# To move to another version, edit the require (and for Kubernetes the v0.x replaces) there,
# run `GOFLAGS=-mod=mod go mod tidy` in that folder and commit go.mod and go.sum.

K8S_TOOLS_MODULES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tools"
TOOLS_DIR=${TOOLS_DIR:-/var/cache/csi-interposer/tools}

# _k8s_tool_version DIR MODULE: the version of MODULE that DIR/go.mod requires.
_k8s_tool_version() {
  awk -v m="$2" '$1 == m && $2 ~ /^v/ { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$K8S_TOOLS_MODULES/$1/go.mod"
}

KUBERNETES_VERSION=$(_k8s_tool_version kubernetes k8s.io/kubernetes)
ETCD_VERSION=$(_k8s_tool_version etcd go.etcd.io/etcd/server/v3)
CSI_PROVISIONER_VERSION=$(_k8s_tool_version csi-provisioner github.com/kubernetes-csi/external-provisioner/v5)

ETCD_BIN="$TOOLS_DIR/etcd-$ETCD_VERSION"
KUBE_APISERVER_BIN="$TOOLS_DIR/kube-apiserver-$KUBERNETES_VERSION"
KUBE_CONTROLLER_MANAGER_BIN="$TOOLS_DIR/kube-controller-manager-$KUBERNETES_VERSION"
KUBECTL_BIN="$TOOLS_DIR/kubectl-$KUBERNETES_VERSION"
CSI_PROVISIONER_BIN="$TOOLS_DIR/csi-provisioner-$CSI_PROVISIONER_VERSION"

# Kubernetes binaries report their version through variables that its release build sets with
# -X (hack/lib/version.sh); without them they say v0.0.0-master.
_k8s_minor=${KUBERNETES_VERSION#v*.}
_k8s_minor=${_k8s_minor%%.*}
_k8s_major=${KUBERNETES_VERSION#v}
_k8s_major=${_k8s_major%%.*}
K8S_VERSION_LDFLAGS=""
for _p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_VERSION_LDFLAGS+=" -X $_p.gitVersion=$KUBERNETES_VERSION -X $_p.gitMajor=$_k8s_major"
  K8S_VERSION_LDFLAGS+=" -X $_p.gitMinor=$_k8s_minor -X $_p.gitTreeState=clean"
done
unset _p _k8s_major _k8s_minor

# One row per binary: BIN-variable, module folder, package, then -ldflags (the rest of the
# row). install-deps builds from this table.
K8S_TOOLS=(
  "ETCD_BIN etcd go.etcd.io/etcd/server/v3"
  "KUBE_APISERVER_BIN kubernetes k8s.io/kubernetes/cmd/kube-apiserver $K8S_VERSION_LDFLAGS"
  "KUBE_CONTROLLER_MANAGER_BIN kubernetes k8s.io/kubernetes/cmd/kube-controller-manager $K8S_VERSION_LDFLAGS"
  "KUBECTL_BIN kubernetes k8s.io/kubernetes/cmd/kubectl $K8S_VERSION_LDFLAGS"
  "CSI_PROVISIONER_BIN csi-provisioner github.com/kubernetes-csi/external-provisioner/v5/cmd/csi-provisioner -X main.version=$CSI_PROVISIONER_VERSION"
)
