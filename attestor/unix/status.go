package unix

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
)

// procStatus is what the attestor takes from /proc/<pid>/status.
type procStatus struct {
	state  byte     // first letter of State:, e.g. 'S', 'Z'
	uid    uint32   // effective uid (second value of Uid:)
	gid    uint32   // effective gid (second value of Gid:)
	groups []uint32 // supplementary gids (Groups:)
}

// parseStatus parses /proc/<pid>/status. It fails closed: State, Uid, Gid and
// Groups must each appear exactly once and be well formed. The kernel escapes
// the process name (the one line a workload controls), so a line can not be
// forged, but a duplicate is treated as an error anyway.
func parseStatus(b []byte) (procStatus, error) {
	var (
		st                          procStatus
		seenState, seenUID, seenGID bool
		seenGroups                  bool
	)
	for line := range bytes.Lines(b) {
		line = bytes.TrimSuffix(line, []byte{'\n'})
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			continue
		}
		key, val := line[:colon], line[colon+1:]
		var err error
		switch string(key) {
		case "State":
			if seenState {
				return procStatus{}, errors.New("status: duplicate State")
			}
			seenState = true
			v := bytes.TrimLeft(val, " \t")
			if len(v) == 0 || v[0] < 'A' || v[0] > 'z' {
				return procStatus{}, fmt.Errorf("status: malformed State %q", val)
			}
			st.state = v[0]
		case "Uid":
			if seenUID {
				return procStatus{}, errors.New("status: duplicate Uid")
			}
			seenUID = true
			if st.uid, err = effectiveID(val); err != nil {
				return procStatus{}, fmt.Errorf("status: Uid: %w", err)
			}
		case "Gid":
			if seenGID {
				return procStatus{}, errors.New("status: duplicate Gid")
			}
			seenGID = true
			if st.gid, err = effectiveID(val); err != nil {
				return procStatus{}, fmt.Errorf("status: Gid: %w", err)
			}
		case "Groups":
			if seenGroups {
				return procStatus{}, errors.New("status: duplicate Groups")
			}
			seenGroups = true
			if st.groups, err = parseIDList(val); err != nil {
				return procStatus{}, fmt.Errorf("status: Groups: %w", err)
			}
		}
	}
	switch {
	case !seenState:
		return procStatus{}, errors.New("status: no State")
	case !seenUID:
		return procStatus{}, errors.New("status: no Uid")
	case !seenGID:
		return procStatus{}, errors.New("status: no Gid")
	case !seenGroups:
		return procStatus{}, errors.New("status: no Groups")
	}
	return st, nil
}

// effectiveID returns the second of the four ids (real, effective, saved,
// filesystem) of a Uid:/Gid: line.
func effectiveID(val []byte) (uint32, error) {
	ids, err := parseIDList(val)
	if err != nil {
		return 0, err
	}
	if len(ids) != 4 {
		return 0, fmt.Errorf("want 4 ids, got %d", len(ids))
	}
	return ids[1], nil
}

// parseIDList parses whitespace-separated decimal ids.
func parseIDList(val []byte) ([]uint32, error) {
	var ids []uint32
	for _, f := range bytes.Fields(val) {
		id, err := parseID(f)
		if err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, nil
}

func parseID(f []byte) (uint32, error) {
	v, err := strconv.ParseUint(string(f), 10, 32)
	if err != nil {
		return 0, fmt.Errorf("malformed id %q", f)
	}
	return uint32(v), nil
}
