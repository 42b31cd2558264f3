package field

import (
	"strings"
	"testing"
)

func TestIsContainer(t *testing.T) {
	for _, tc := range []struct {
		name string
		want bool
	}{
		{K8sContainerName, true},
		{K8sContainerID, true},
		{K8sContainerImage, true},
		{K8sContainerImageID, true},
		{K8sContainerType, true},
		{K8sNamespace, false},
		{K8sPodUID, false},
		{PodLabel("container_name"), false},
		{UnixUID, false},
	} {
		if got := IsContainer(tc.name); got != tc.want {
			t.Errorf("IsContainer(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name, wantErr string
	}{
		{UnixUID, ""},
		{K8sPodInitImageCount, ""},
		{PodLabel("app.kubernetes.io/name"), ""},
		{PodLabel("a b"), `field "kubernetes.pod_label.a b": invalid label key "a b"`},
		{PodLabel(""), `invalid label key ""`},
		{"unix.uid2", `unknown field "unix.uid2"`},
		{"kubernetes.container_", `unknown field`},
		{"", `unknown field ""`},
	} {
		err := Check(tc.name)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("Check(%q) = %v, want nil", tc.name, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("Check(%q) = %v, want %q", tc.name, err, tc.wantErr)
		}
	}
}
