package config

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// PortSet is a set of TCP ports given as ranges. The zero value allows none;
// AllPorts allows every port.
type PortSet struct {
	ranges [][2]uint16 // sorted, inclusive
}

// AllPorts returns a set holding every port 1–65535.
func AllPorts() PortSet { return PortSet{ranges: [][2]uint16{{1, 65535}}} }

// Contains reports whether port p is in the set.
func (s PortSet) Contains(p uint16) bool {
	for _, r := range s.ranges {
		if p >= r[0] && p <= r[1] {
			return true
		}
	}
	return false
}

// String formats the set as ParsePorts reads it.
func (s PortSet) String() string {
	if len(s.ranges) == 0 {
		return "none"
	}
	if len(s.ranges) == 1 && s.ranges[0] == [2]uint16{1, 65535} {
		return "all"
	}
	parts := make([]string, 0, len(s.ranges))
	for _, r := range s.ranges {
		if r[0] == r[1] {
			parts = append(parts, strconv.Itoa(int(r[0])))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", r[0], r[1]))
		}
	}
	return strings.Join(parts, ",")
}

// PortsOf returns the set of the given ports.
func PortsOf(ports ...uint16) PortSet {
	var s PortSet
	for _, p := range ports {
		s.ranges = append(s.ranges, [2]uint16{p, p})
	}
	return s.merged()
}

// Empty reports whether the set holds no port.
func (s PortSet) Empty() bool { return len(s.ranges) == 0 }

// Union returns the ports of s and of o.
func (s PortSet) Union(o PortSet) PortSet {
	u := PortSet{ranges: append(slices.Clone(s.ranges), o.ranges...)}
	return u.merged()
}

// Outside returns a port of s that o does not hold, if there is one.
func (s PortSet) Outside(o PortSet) (uint16, bool) {
	for _, r := range s.ranges {
		for p := int(r[0]); p <= int(r[1]); p++ {
			if !o.Contains(uint16(p)) {
				return uint16(p), true
			}
		}
	}
	return 0, false
}

// merged sorts the ranges and joins those that touch or overlap.
func (s PortSet) merged() PortSet {
	if len(s.ranges) == 0 {
		return PortSet{}
	}
	slices.SortFunc(s.ranges, func(x, y [2]uint16) int { return int(x[0]) - int(y[0]) })
	merged := s.ranges[:1]
	for _, r := range s.ranges[1:] {
		last := &merged[len(merged)-1]
		if int(r[0]) <= int(last[1])+1 {
			last[1] = max(last[1], r[1])
		} else {
			merged = append(merged, r)
		}
	}
	return PortSet{ranges: merged}
}

// ParsePorts parses "all", "none" or a comma-separated list of ports and ranges such
// as "8000-8100,9443".
func ParsePorts(s string) (PortSet, error) {
	s = strings.TrimSpace(s)
	if s == "all" || s == "*" {
		return AllPorts(), nil
	}
	if s == "none" {
		return PortSet{}, nil
	}
	if s == "" {
		return PortSet{}, fmt.Errorf("empty port list: give ports such as 8000-8100,9443, or all")
	}
	var set PortSet
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := parsePort(lo)
		if err != nil {
			return PortSet{}, fmt.Errorf("%q: %v", part, err)
		}
		b := a
		if isRange {
			if b, err = parsePort(hi); err != nil {
				return PortSet{}, fmt.Errorf("%q: %v", part, err)
			}
			if b < a {
				return PortSet{}, fmt.Errorf("%q: range ends before it starts", part)
			}
		}
		set.ranges = append(set.ranges, [2]uint16{a, b})
	}
	return set.merged(), nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("want a port number 1-65535")
	}
	return uint16(n), nil
}
