// Package rules turns the attested facts about a workload (attestor.Attributes)
// into the SPIFFE IDs it is entitled to.
//
// A configuration is a list of SVIDs. Each has a SPIFFE ID template, an
// optional hint, optional DNS name templates, and rules; the SVID is issued
// when any rule matches, and a rule matches when all of its match entries and
// selectors hold. Compile checks everything once; Set.Evaluate then only
// compares strings, so it can run on every Workload API call.
//
// # Templates
//
// "{field}" in the path of a SPIFFE ID or in a DNS name is replaced by the
// field's value, e.g. "/ns/{kubernetes.namespace}/sa/{kubernetes.service_account}".
// Placeholders may name any unix.* or kubernetes.* field, including
// kubernetes.pod_label.<key>; they may not appear in the trust domain. An
// SVID is not issued when a field it needs is absent or has several values,
// or when a value would not fit: in a SPIFFE ID a value must be one path
// segment (letters, digits, '.', '-', '_'; not "." or ".."), in a DNS name
// one label's worth of lower-case letters, digits and '-'. Values are never
// rewritten (no lower-casing, no escaping), so two workloads cannot be
// mapped onto one name.
//
// # Selectors
//
// SPIRE-style selectors are translated to the same fields:
//
//	selector                                  holds when
//	k8s:ns:<v>                                kubernetes.namespace = v
//	k8s:sa:<v>                                kubernetes.service_account = v
//	k8s:pod-name:<v>                          kubernetes.pod_name = v
//	k8s:pod-uid:<v>                           kubernetes.pod_uid = v
//	k8s:pod-label:<k>:<v>                     kubernetes.pod_label.<k> = v
//	k8s:node-name:<v>                         kubernetes.node_name = v
//	k8s:container-name:<v>                    kubernetes.container_name = v
//	k8s:container-image:<v>                   kubernetes.container_image = v or kubernetes.container_image_id = v
//	k8s:pod-image:<v>                         any kubernetes.pod_image = v
//	k8s:pod-init-image:<v>                    any kubernetes.pod_init_image = v
//	k8s:pod-image-count:<n>                   kubernetes.pod_image_count = n
//	k8s:pod-init-image-count:<n>              kubernetes.pod_init_image_count = n
//	k8s:pod-owner:<kind>:<name>               kubernetes.pod_owner_kind = kind and kubernetes.pod_owner_name = name (same owner)
//	k8s:pod-owner-uid:<v>                     kubernetes.pod_owner_uid = v
//	unix:uid:<n>                              unix.uid = n
//	unix:user:<v>                             unix.user = v
//	unix:gid:<n>                              unix.gid = n
//	unix:group:<v>                            unix.group = v
//	unix:supplementary_gid:<n>                any unix.supplementary_gid = n
//	unix:supplementary_group:<v>              any unix.supplementary_group = v
//	unix:path:<v>                             unix.path = v
//	unix:sha256:<v>                           unix.sha256 = v (64 hex digits, compared lower-case)
//
// Only the type, the name (and for pod-label and pod-owner the key or kind)
// are split off at ':'; the rest is the value, so image references such as
// "k8s:container-image:ghcr.io/org/app:v1.2@sha256:..." work. Numbers are
// compared in canonical decimal ("007" matches "7").
package rules
